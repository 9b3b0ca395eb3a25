"""The WSGI application every Python backend of bench/bench.py serves.

/hello   12 bytes          /64k, /1m   responses of that size
/upload  reads the body, answers its length
/sleep   waits 100 ms (cooperatively under gevent), then hello
/cpu     about 0.35 ms of pure-Python work, then hello: the backend, not
         the front end, is then what limits requests per second
/stream  a generator of 10 blocks of 1 KB, no length: a streamed response
/burn    4 ms of the process's CPU time, then hello (overload.py)
"""
import time

HELLO = b'Hello, World'
BODIES = {'/64k': b'x' * 65536, '/1m': b'x' * 1048576}

try:                                    # gevent's sleep where gevent runs
    from gevent import sleep
except ImportError:
    sleep = time.sleep


def blocks():
    for _ in range(10):
        yield BLOCK


BLOCK = b'x' * 1023 + b'\n'


def app(environ, start_response):
    path = environ.get('PATH_INFO', '/')
    if path == '/stream':
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return blocks()
    if path == '/upload':
        stream = environ['wsgi.input']
        length = int(environ.get('CONTENT_LENGTH') or 0)
        received = 0
        while received < length:
            chunk = stream.read(min(65536, length - received))
            if not chunk:
                break
            received += len(chunk)
        body = str(received).encode()
    elif path == '/sleep':
        sleep(0.1)
        body = HELLO
    elif path == '/burn':
        end = time.process_time() + 0.004
        while time.process_time() < end:
            pass
        body = HELLO
    elif path == '/cpu':
        total = 0
        for i in range(12000):
            total += i * i
        body = HELLO
    else:
        body = BODIES.get(path, HELLO)
    start_response('200 OK', [('Content-Type', 'text/plain'),
                              ('Content-Length', str(len(body)))])
    return [body]


application = app
