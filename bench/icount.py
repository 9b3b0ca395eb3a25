"""Instructions per hello request, by callgrind: a deterministic figure for
comparing two versions of the module on a noisy machine.

    python3 bench/icount.py gevent_fastcgi.py [old/gevent_fastcgi.py ...]
    python3 bench/icount.py --status --access-log gevent_fastcgi.py

Client and server run in one process over loopback, on one kept-open
connection; two runs (300 and 1,300 requests) are subtracted, so start-up
cancels out.  Needs valgrind.
"""
import argparse
import os
import subprocess
import sys
import tempfile

LOOP = r'''
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location('gevent_fastcgi', sys.argv[1])
fcgi = importlib.util.module_from_spec(spec)
sys.modules['gevent_fastcgi'] = fcgi
spec.loader.exec_module(fcgi)
import gevent, gevent.socket


def app(environ, start_response):
    start_response('200 OK', [('Content-Type', 'text/plain')])
    return [b'Hello, World']


options = {}
if os.environ.get('ICOUNT_STATUS'):
    options['status_path'] = '/status'
if os.environ.get('ICOUNT_LOG'):
    options['access_log'] = os.environ['ICOUNT_LOG']
server = fcgi.FastCGIServer(('127.0.0.1', 0), fcgi.WSGIRequestHandler(app),
                            **options)
server.start()
environ = {'REQUEST_METHOD': 'GET', 'SCRIPT_NAME': '', 'PATH_INFO': '/hello',
           'QUERY_STRING': '', 'REQUEST_URI': '/hello',
           'SERVER_PROTOCOL': 'HTTP/1.1', 'SERVER_NAME': 'localhost',
           'SERVER_PORT': '80', 'REMOTE_ADDR': '127.0.0.1',
           'CONTENT_TYPE': '', 'CONTENT_LENGTH': ''}
wire = (fcgi.encode_begin_request(1, 1, True)
        + fcgi.encode_records(4, 1, fcgi.encode_pairs(environ))
        + fcgi.encode_records(4, 1) + fcgi.encode_records(5, 1))
end = fcgi.encode_end_request(1)


def client(count):
    sock = gevent.socket.create_connection(server.address)
    for _ in range(count):
        sock.sendall(wire)
        data = b''
        while not data.endswith(end):
            data += sock.recv(65536)
    sock.close()


gevent.spawn(client, 100).join()            # warm up
gevent.spawn(client, int(sys.argv[2])).join()
'''


def instructions(module, count, env):
    with tempfile.NamedTemporaryFile('w', suffix='.py') as loop:
        loop.write(LOOP)
        loop.flush()
        result = subprocess.run(
            ['valgrind', '--tool=callgrind', '--callgrind-out-file=/dev/null',
             sys.executable, loop.name, module, str(count)],
            env=dict(env, PYTHONHASHSEED='0'), capture_output=True, text=True,
            check=True)
    for line in result.stderr.splitlines():
        if 'Collected' in line:
            return int(line.split()[-1])
    raise RuntimeError(result.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('modules', nargs='+')
    parser.add_argument('--status', action='store_true',
                        help='with status_path set')
    parser.add_argument('--access-log', action='store_true',
                        help='with the access log to a temporary file')
    args = parser.parse_args()
    env = dict(os.environ, ICOUNT_STATUS='1' if args.status else '')
    with tempfile.TemporaryDirectory() as folder:
        if args.access_log:
            env['ICOUNT_LOG'] = os.path.join(folder, 'access.log')
        for module in args.modules:
            low, high = (instructions(module, count, env)
                         for count in (300, 1300))
            print('%s: %d instructions per request'
                  % (module, (high - low) // 1000))


if __name__ == '__main__':
    main()
