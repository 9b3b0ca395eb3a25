"""Soak test: minutes of mixed load through nginx, reporting failed requests
and the workers' memory over time.

    python3 bench/soak.py [--duration 600] [--warmup 60] [--workers 2]

It starts gevent_fastcgi (this repository's copy) with --workers and nginx in
front, both on loopback with temporary files, then runs --clients threads that
pick, request after request, from a mix: GET, POST echoes of 64 KB to 1 MB,
chunked uploads, 5 MB downloads, clients that hang up in the middle of a 20 MB
download (aborted on purpose), FCGI_ABORT_REQUEST sent straight to the server
over FastCGI (aborted on purpose), and slow requests.  Every response is
checked byte for byte.  Every --report seconds it prints the counts and the
RSS of each worker.

It passes when no request failed (other than those aborted on purpose) and the
workers' total RSS at the end is within 10% of what it was after --warmup.
Not a unit test: it takes as long as --duration says.
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (FASTCGI_PARAMS, NGINX_TEMP_PATHS, children, free_port,
                    rss_kb, wait_for_port)  # noqa: E402
ROOT = os.path.dirname(HERE)
BLOCK = bytes(range(256)) * 4096                # 1 MiB


# -- the application the server runs (imported by it as soak:app) ------------

def app(environ, start_response):
    import gevent
    path = environ['PATH_INFO']
    if path == '/echo':
        body = environ['wsgi.input'].read()
        start_response('200 OK', [('Content-Type', 'application/octet-stream'),
                                  ('X-Sha256', hashlib.sha256(body).hexdigest())])
        return [body]
    if path == '/big':
        size = int(environ['QUERY_STRING'])
        start_response('200 OK', [('Content-Length', str(size))])
        return (BLOCK[:min(len(BLOCK), size - offset)]
                for offset in range(0, size, len(BLOCK)))
    if path == '/sleep':
        gevent.sleep(float(environ['QUERY_STRING'] or 0.2))
    start_response('200 OK', [('Content-Type', 'text/plain')])
    return [b'Hello, World']


# -- processes ----------------------------------------------------------------

NGINX_CONF = """
daemon off;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
""" + NGINX_TEMP_PATHS + """    upstream app {{ server 127.0.0.1:{app_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            fastcgi_pass app;
            fastcgi_keep_conn on;
{params}        }}
    }}
}}
"""














# -- the load -----------------------------------------------------------------

class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = {}
        self.aborted = {}
        self.failed = {}
        self.failures = []

    def add(self, table, kind):
        with self.lock:
            table[kind] = table.get(kind, 0) + 1

    def fail(self, kind, why):
        with self.lock:
            self.failed[kind] = self.failed.get(kind, 0) + 1
            if len(self.failures) < 20:
                self.failures.append('%s: %s' % (kind, why))


def http_request(port, method, path, body=None, headers=None, chunked=False):
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {},
                     encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def do_get(port, rng):
    status, _, body = http_request(port, 'GET', '/hello')
    return status == 200 and body == b'Hello, World'


def do_echo(port, rng):
    body = rng.randbytes(rng.randint(64 * 1024, 1024 * 1024))
    status, headers, echoed = http_request(port, 'POST', '/echo', body)
    return status == 200 and echoed == body


def do_chunked(port, rng):
    parts = [rng.randbytes(rng.randint(1, 32 * 1024)) for _ in range(8)]
    status, _, echoed = http_request(port, 'POST', '/echo', iter(parts),
                                     {'Transfer-Encoding': 'chunked'},
                                     chunked=True)
    return status == 200 and echoed == b''.join(parts)


def do_download(port, rng):
    size = 5 * 1024 * 1024
    status, _, body = http_request(port, 'GET', '/big?%d' % size)
    return status == 200 and body == (BLOCK * 5)


def do_slow(port, rng):
    status, _, body = http_request(port, 'GET', '/sleep?0.2')
    return status == 200 and body == b'Hello, World'


def do_hang_up(port, rng):
    """A client that goes away in the middle of a 20 MB download."""
    sock = socket.create_connection(('127.0.0.1', port), timeout=30)
    sock.sendall(b'GET /big?%d HTTP/1.1\r\nHost: soak\r\n\r\n'
                 % (20 * 1024 * 1024))
    received = 0
    while received < 256 * 1024:
        data = sock.recv(65536)
        if not data:
            return False
        received += len(data)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                    struct.pack('ii', 1, 0))
    sock.close()
    return 'aborted'


def do_fastcgi_abort(app_port, rng):
    """FCGI_ABORT_REQUEST, sent straight to the server: it must answer the
    aborted request at once, and serve the next one on the connection."""
    import gevent_fastcgi as fcgi
    sock = socket.create_connection(('127.0.0.1', app_port), timeout=30)
    try:
        params = fcgi.encode_pairs({'REQUEST_METHOD': 'GET',
                                    'PATH_INFO': '/sleep',
                                    'QUERY_STRING': '5'})
        sock.sendall(fcgi.encode_begin_request(1, keep_conn=True)
                     + fcgi.encode_records(fcgi.FCGI_PARAMS, 1, params)
                     + fcgi.encode_records(fcgi.FCGI_PARAMS, 1)
                     + fcgi.encode_records(fcgi.FCGI_STDIN, 1))
        time.sleep(rng.uniform(0, 0.1))
        t0 = time.monotonic()
        sock.sendall(fcgi.encode_records(fcgi.FCGI_ABORT_REQUEST, 1))
        parser = fcgi.RecordParser()
        while True:
            data = sock.recv(65536)
            if not data:
                return False
            if any(rtype == fcgi.FCGI_END_REQUEST
                   for rtype, _, _ in parser.feed(data)):
                break
        if time.monotonic() - t0 > 1.0:
            return False
        return 'aborted'
    finally:
        sock.close()


MIX = [(50, 'get', do_get), (12, 'echo', do_echo), (5, 'chunked', do_chunked),
       (10, 'download', do_download), (8, 'slow', do_slow),
       (8, 'hang-up', do_hang_up), (7, 'fcgi-abort', do_fastcgi_abort)]


def client_loop(stop_at, web_port, app_port, stats, seed):
    rng = random.Random(seed)
    weights = [w for w, _, _ in MIX]
    while time.monotonic() < stop_at:
        _, kind, action = rng.choices(MIX, weights)[0]
        port = app_port if kind == 'fcgi-abort' else web_port
        try:
            result = action(port, rng)
        except Exception as exc:
            stats.fail(kind, '%s: %s' % (type(exc).__name__, exc))
            continue
        if result == 'aborted':
            stats.add(stats.aborted, kind)
        elif result:
            stats.add(stats.ok, kind)
        else:
            stats.fail(kind, 'wrong response')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--duration', type=float, default=600.0)
    parser.add_argument('--warmup', type=float, default=60.0)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--clients', type=int, default=16)
    parser.add_argument('--report', type=float, default=30.0)
    parser.add_argument('--json', help='write the results to this file')
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)

    work = tempfile.mkdtemp(prefix='gevent-fastcgi-soak-')
    os.chmod(work, 0o777)
    app_port, web_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, '-m', 'gevent_fastcgi', '--bind',
         '127.0.0.1:%d' % app_port, '--workers', str(args.workers),
         '--log-level', 'warning', '--chdir', HERE, 'soak:app'],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
        stdout=open(os.path.join(work, 'server.log'), 'w'),
        stderr=subprocess.STDOUT)
    conf = os.path.join(work, 'nginx.conf')
    with open(conf, 'w') as f:
        f.write(NGINX_CONF.format(
            dir=work, port=web_port, app_port=app_port, params=FASTCGI_PARAMS,
            user='user nobody nogroup;' if os.geteuid() == 0 else ''))
    nginx = subprocess.Popen([shutil.which('nginx') or '/usr/sbin/nginx',
                              '-p', work, '-c', conf])
    wait_for_port(app_port)
    wait_for_port(web_port)
    while len(children(server.pid)) < args.workers:
        time.sleep(0.05)

    stats = Stats()
    start = time.monotonic()
    stop_at = start + args.duration
    threads = [threading.Thread(target=client_loop,
                                args=(stop_at, web_port, app_port, stats, i))
               for i in range(args.clients)]
    for thread in threads:
        thread.start()
    samples = []
    baseline = None
    print('%7s %9s %8s %6s  %s' % ('seconds', 'ok', 'aborted', 'failed',
                                   'RSS of each worker (KB)'), flush=True)
    next_report = start + args.report
    while any(thread.is_alive() for thread in threads):
        time.sleep(1.0)
        now = time.monotonic()
        workers = children(server.pid)
        rss = [rss_kb(pid) for pid in workers]
        samples.append((round(now - start, 1), workers, rss))
        if baseline is None and now - start >= args.warmup:
            baseline = sum(rss)
        if now >= next_report or not any(t.is_alive() for t in threads):
            next_report += args.report
            with stats.lock:
                print('%7.0f %9d %8d %6d  %s' % (
                    now - start, sum(stats.ok.values()),
                    sum(stats.aborted.values()), sum(stats.failed.values()),
                    ' '.join(str(r) for r in rss)), flush=True)
    for thread in threads:
        thread.join()
    final = sum(samples[-1][2])
    nginx.send_signal(signal.SIGQUIT)
    server.send_signal(signal.SIGTERM)
    server_status = server.wait(60)
    nginx.wait(30)
    with open(os.path.join(work, 'server.log')) as f:
        server_log = f.read()
    with open(os.path.join(work, 'error.log')) as f:
        nginx_errors = [line for line in f if '[error]' in line
                        or '[crit]' in line or '[alert]' in line]
    shutil.rmtree(work, ignore_errors=True)

    growth = (final - baseline) / baseline * 100 if baseline else float('nan')
    failed = sum(stats.failed.values())
    tracebacks = server_log.count('Traceback')
    passed = (failed == 0 and baseline is not None and growth <= 10.0
              and server_status == 0 and tracebacks == 0)
    print()
    print('duration %.0fs, %d clients, %d workers' % (
        args.duration, args.clients, args.workers))
    print('ok:      %s' % json.dumps(stats.ok, sort_keys=True))
    print('aborted: %s (on purpose)' % json.dumps(stats.aborted,
                                                  sort_keys=True))
    print('failed:  %s' % json.dumps(stats.failed, sort_keys=True))
    for failure in stats.failures:
        print('  ' + failure)
    print('workers RSS total: %s KB after %.0fs warm-up, %d KB at the end '
          '(%+.1f%%)' % (baseline, args.warmup, final, growth))
    print('server exit status %s, %d tracebacks in its log, %d nginx error '
          'lines' % (server_status, tracebacks, len(nginx_errors)))
    for line in nginx_errors[:5]:
        print('  ' + line.rstrip())
    print('PASS' if passed else 'FAIL')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'ok': stats.ok, 'aborted': stats.aborted,
                       'failed': stats.failed, 'failures': stats.failures,
                       'rss_baseline_kb': baseline, 'rss_final_kb': final,
                       'growth_percent': growth, 'samples': samples,
                       'server_status': server_status,
                       'nginx_errors': nginx_errors, 'passed': passed}, f)
    return 0 if passed else 1


if __name__ == '__main__':
    sys.exit(main())
