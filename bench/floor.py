"""An application's own CPU time per request, with no server: called
in-process with the environ nginx's parameters make, its body iterated
and closed.  bench.py subtracts it from a backend's CPU per request to
show what the server itself costs.

    python3 bench/floor.py flask_app:app /flask/item/7 [seconds]
"""
import io
import os
import pkgutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def environ(path):
    """What nginx sends for wrk's GET (README.rst's fastcgi_params, and the
    request's headers as HTTP_*), as a WSGI server completes it."""
    return {
        'REQUEST_METHOD': 'GET', 'QUERY_STRING': '', 'CONTENT_TYPE': '',
        'CONTENT_LENGTH': '', 'SCRIPT_NAME': '', 'PATH_INFO': path,
        'REQUEST_URI': path, 'SERVER_PROTOCOL': 'HTTP/1.1',
        'SERVER_NAME': 'localhost', 'SERVER_PORT': '8080',
        'REMOTE_ADDR': '127.0.0.1', 'HTTP_HOST': '127.0.0.1:8080',
        'wsgi.version': (1, 0), 'wsgi.url_scheme': 'http',
        'wsgi.input': io.BytesIO(), 'wsgi.errors': sys.stderr,
        'wsgi.multithread': True, 'wsgi.multiprocess': False,
        'wsgi.run_once': False}


def per_request(app, path, seconds):
    def start_response(status, headers, exc_info=None):
        return None

    def one():
        result = app(environ(path), start_response)
        try:
            for _ in result:
                pass
        finally:
            if hasattr(result, 'close'):
                result.close()
    for _ in range(200):        # warm caches, imports, templates
        one()
    count = 0
    started = time.process_time()
    while time.process_time() - started < seconds:
        for _ in range(100):
            one()
        count += 100
    return (time.process_time() - started) / count


def main():
    sys.path.insert(0, HERE)
    app = pkgutil.resolve_name(sys.argv[1])
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
    print('%.2f' % (per_request(app, sys.argv[2], seconds) * 1e6))


if __name__ == '__main__':
    main()
