"""Benchmark gevent_fastcgi against its peers, in the same run.

    python3 bench/bench.py                    # everything, 3 rounds
    python3 bench/bench.py --rounds 5 --duration 10 --only flask-c50
    python3 bench/bench.py --real             # the real applications only

nginx (one worker) is in front and wrk is the client, all on loopback.  The
same WSGI application runs behind each backend in turn: what users run
first (flask_app.py, a JSON route with a path parameter; django_app.py, a
template over 20 rows under startproject's middleware; a streamed
generator), then bench_app.py's hello and sizes.  The backends:

  ours          gevent_fastcgi (this repository's copy), nginx
                fastcgi_keep_conn on, upstream keepalive
  ours-visible  the same with --status-path and --access-log to a file
  original      the original gevent-fastcgi 1.1.0.0 from PyPI (C speedups)
  flup          flup 1.0.3 (threads)
  uwsgi-native  uWSGI 2.0, its own protocol (nginx uwsgi_pass), --gevent 100
  uwsgi-fastcgi uWSGI 2.0 with --fastcgi-socket and --gevent 1000, nginx
                keep_conn off: uWSGI closes a FastCGI connection after each
                response even when nginx keeps it ("upstream prematurely
                closed" in nginx's log)
  gunicorn      gunicorn with the gevent worker, behind nginx proxy_pass
                (HTTP/1.1, upstream keepalive)
  libfcgi       a C program on libfcgi under spawn-fcgi: the cost of the
                protocol itself (hello, and 1 MB uploads, which it reads and
                discards; one connection per request, as libfcgi serves one
                connection at a time)

For the real applications, the report also gives each application's floor:
its own CPU per request called in-process with no server (floor.py), and
each backend's overhead over it.

The peers go into a virtual environment of their own (bench/.peers), made by
this script on first use; the C program is built in bench/.build.  Debian
packages needed: nginx-light wrk haproxy spawn-fcgi libfcgi-dev gcc
(--install-debs installs them).

Each round runs every backend, alternating, and each workload for --duration
seconds; the report gives medians over rounds of successful requests per
second (wrk counts a 502 as a request; we do not), the backend's CPU time per
request (user + system of all its processes, from /proc before and after the
run, divided by the requests served) and wrk's median latency; then what the
front end (nginx or HAProxy, and wrk) costs per request and the cores left
idle.  On a small machine nginx and wrk share the cores with the backend, so
requests per second are capped by the front end: CPU per request is the
figure that says how much work a backend does.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, NamedTuple, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (FASTCGI_PARAMS, NGINX_TEMP_PATHS, free_port,
                    process_tree, rss_kb, wait_for_port, which)  # noqa: E402
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, '.peers')
BUILD = os.path.join(HERE, '.build')
# packaging: gunicorn's gevent worker imports it without requiring it
PEER_PACKAGES = ['uwsgi>=2.0,<2.1', 'gevent-fastcgi==1.1.0.0', 'flup==1.0.3',
                 'gunicorn', 'packaging']
# the same versions as ours runs with, so that only the servers differ
SAME_AS_OURS = ['gevent', 'greenlet', 'Flask', 'Werkzeug', 'Django']
DEBS = ['nginx-light', 'wrk', 'haproxy', 'spawn-fcgi', 'libfcgi-dev', 'gcc']
TICK = os.sysconf('SC_CLK_TCK')

LIBFCGI_HELLO = r"""
#include <stdio.h>
#include <stdlib.h>
#include <fcgiapp.h>
/* hello, and for a POST: read the body, answer its length (the upload
   workload's reference: what reading a body costs in C) */
int main(void) {
    FCGX_Request request;
    static char buffer[65536];
    FCGX_Init();
    FCGX_InitRequest(&request, 0, 0);
    while (FCGX_Accept_r(&request) >= 0) {
        const char *length = FCGX_GetParam("CONTENT_LENGTH", request.envp);
        if (length && atol(length) > 0) {
            long received = 0, n;
            char answer[32];
            while ((n = FCGX_GetStr(buffer, sizeof buffer, request.in)) > 0)
                received += n;
            n = snprintf(answer, sizeof answer, "%ld", received);
            FCGX_FPrintF(request.out, "Status: 200 OK\r\nContent-Type: "
                         "text/plain\r\nContent-Length: %ld\r\n\r\n%s",
                         n, answer);
        } else {
            FCGX_PutS("Status: 200 OK\r\nContent-Type: text/plain\r\n"
                      "Content-Length: 12\r\n\r\nHello, World", request.out);
        }
        FCGX_Finish_r(&request);
    }
    return 0;
}
"""

# -- setting up ---------------------------------------------------------------


def peer(name):
    return os.path.join(PEERS, 'bin', name)


def setup(install_debs):
    missing = [tool for tool in ('nginx', 'wrk', 'haproxy', 'spawn-fcgi',
                                 'gcc') if not which(tool)]
    if missing or not os.path.exists('/usr/include/fcgiapp.h'):
        if not install_debs:
            raise SystemExit('missing %s: run with --install-debs, or: '
                             'apt-get install -y %s'
                             % (', '.join(missing) or 'libfcgi-dev',
                                ' '.join(DEBS)))
        subprocess.run(['apt-get', 'update', '-qq'], check=True)
        subprocess.run(['apt-get', 'install', '-y', '-qq'] + DEBS, check=True)
        for service in ('nginx', 'haproxy'):
            subprocess.run(['service', service, 'stop'],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from importlib.metadata import version
    pins = ['%s==%s' % (name, version(name)) for name in SAME_AS_OURS]
    complete = os.path.join(PEERS, '.complete')
    try:
        with open(complete) as f:
            ready = f.read().split() == pins
    except FileNotFoundError:
        ready = False
    if not ready:
        print('installing the peers into %s ...' % PEERS, flush=True)
        subprocess.run([sys.executable, '-m', 'venv', PEERS], check=True)
        subprocess.run([peer('pip'), 'install', '-q',
                        '--disable-pip-version-check'] + PEER_PACKAGES
                       + pins, check=True)
        with open(complete, 'w') as f:
            f.write(' '.join(pins))
    binary = os.path.join(BUILD, 'hello_fcgi')
    source = os.path.join(BUILD, 'hello_fcgi.c')
    try:
        with open(source) as f:
            built = f.read() == LIBFCGI_HELLO and os.path.exists(binary)
    except FileNotFoundError:
        built = False
    if not built:
        os.makedirs(BUILD, exist_ok=True)
        with open(source, 'w') as f:
            f.write(LIBFCGI_HELLO)
        subprocess.run(['gcc', '-O2', '-o', binary, source, '-lfcgi'],
                       check=True)





def versions():
    out = subprocess.run([peer('pip'), 'list', '--format', 'json'],
                         capture_output=True, text=True).stdout
    pkgs = {p['name'].lower(): p['version'] for p in json.loads(out)}
    import gevent
    sys.path.insert(0, ROOT)
    import gevent_fastcgi
    nginx = subprocess.run([which('nginx'), '-v'], capture_output=True,
                           text=True).stderr.strip()
    return {'ours': gevent_fastcgi.__version__, 'gevent': gevent.__version__,
            'original': pkgs.get('gevent-fastcgi'), 'flup': pkgs.get('flup'),
            'uwsgi': pkgs.get('uwsgi'), 'gunicorn': pkgs.get('gunicorn'),
            'flask': pkgs.get('flask'), 'django': pkgs.get('django'),
            'nginx': nginx, 'python': sys.version.split()[0]}


# -- backends -----------------------------------------------------------------

ORIGINAL = """
import sys
from gevent_fastcgi.server import FastCGIServer
from gevent_fastcgi.wsgi import WSGIRequestHandler
from bench_app import app
# (no max_reqs: it is not a parameter of the original, whose FastCGIServer
# hands unknown keywords to gevent as SSL arguments; every connection failed)
FastCGIServer(('127.0.0.1', int(sys.argv[1])), WSGIRequestHandler(app),
              max_conns=4096).serve_forever()
"""

FLUP = """
import sys
from flup.server.fcgi import WSGIServer
from bench_app import app
WSGIServer(app, bindAddress=('127.0.0.1', int(sys.argv[1])),
           maxThreads=600).run()
"""


#: the applications, as module:callable in bench/
APPS = {'bench': 'bench_app:app', 'flask': 'flask_app:app',
        'django': 'django_app:application'}


#: --baseline DIR: another checkout of ours, run as 'baseline' beside 'ours'
BASELINE = None


def backend_command(name, port, workers, app='bench'):
    """-> (argv, cwd, env, protocol) for one backend."""
    clean_env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    spec = APPS[app]
    if name.split('-')[0] in ('ours', 'baseline'):
        # (run from its folder: "python -m" looks there first)
        root = BASELINE if name.startswith('baseline') else ROOT
        argv = [sys.executable, '-m', 'gevent_fastcgi', '--bind',
                '127.0.0.1:%d' % port, '--log-level', 'warning',
                '--max-conns', '4096', '--max-reqs', '4096',
                '--backlog', '4096', '--chdir', HERE, spec]
        if workers > 1:
            argv[3:3] = ['--workers', str(workers)]
        if name.endswith('-visible'):   # what an operator turns on
            argv[3:3] = ['--status-path', '/status', '--access-log',
                         os.path.join(tempfile.gettempdir(),
                                      'gevent-fastcgi-bench-access.log')]
        return argv, root, dict(clean_env, PYTHONPATH=root), 'fastcgi'
    if name == 'original':
        # run from bench/, where no gevent_fastcgi.py shadows the package
        return ([peer('python'), '-c', ORIGINAL, str(port)], HERE, clean_env,
                'fastcgi')
    if name == 'flup':
        return [peer('python'), '-c', FLUP, str(port)], HERE, clean_env, \
            'fastcgi'
    if name in ('uwsgi-fastcgi', 'uwsgi-native'):
        if name == 'uwsgi-native':
            socket_args, protocol = ['--socket'], 'uwsgi'
            greenlets = '100'
        else:
            socket_args = ['--fastcgi-socket']
            protocol, greenlets = 'fastcgi-one-per-connection', '1000'
        return ([peer('uwsgi')] + socket_args + [
            '127.0.0.1:%d' % port, '--gevent', greenlets, '--module', spec,
            '--pythonpath', HERE, '--master', '--processes', str(workers),
            '--disable-logging', '--die-on-term', '--listen', '1024'],
            HERE, clean_env, protocol)
    if name == 'gunicorn':
        return ([peer('gunicorn'), '-k', 'gevent', '-w', str(workers), '-b',
                 '127.0.0.1:%d' % port, '--worker-connections', '4096',
                 '--backlog', '2048', '--log-level', 'warning',
                 spec], HERE, clean_env, 'http')
    if name == 'libfcgi':
        return ([which('spawn-fcgi'), '-n', '-a', '127.0.0.1', '-p',
                 str(port), '-b', '1024', '--',
                 os.path.join(BUILD, 'hello_fcgi')], HERE, clean_env,
                'fastcgi-one-per-connection')
    raise ValueError(name)


NGINX_CONF = """
daemon off;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
    access_log off;
""" + NGINX_TEMP_PATHS + """    client_body_buffer_size 2m;
    upstream backend {{
        server 127.0.0.1:{backend_port};
        {keepalive}
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
{location}
        }}
    }}
}}
"""

FASTCGI_LOCATION = """
            fastcgi_pass backend;
            {keep_conn}
""" + FASTCGI_PARAMS

UWSGI_LOCATION = """
            uwsgi_pass backend;
""" + FASTCGI_PARAMS.replace('fastcgi_param', 'uwsgi_param')

HTTP_LOCATION = """
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
"""

HAPROXY_CONF = """
global
    pidfile {dir}/haproxy.pid
    maxconn 8192
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    maxconn 8192
fcgi-app app
    docroot /
    path-info ^()(/.*)$
    option keep-conn
    option mpxs-conns
    option max-reqs 1000
frontend fe
    bind 127.0.0.1:{port}
    default_backend app
backend app
    use-fcgi-app app
    http-reuse always
    server s1 127.0.0.1:{backend_port} proto fcgi
"""











def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open('/proc/%d/stat' % pid) as f:
                fields = f.read().rsplit(')', 1)[1].split()
            total += int(fields[11]) + int(fields[12])   # utime, stime
        except (FileNotFoundError, IndexError):
            pass
    return total / TICK





# nginx keeps the 1 MB request bodies it buffers in its heap.  With glibc's
# default trimming, in about half the runs (at random) it gave that memory
# back after each upload and faulted it in again for the next: a brk() per
# request, 600,000 page faults in 3 s, and its CPU per upload doubled, for
# every backend alike.  A fixed trim threshold keeps the front end the same
# from run to run; backends keep their own malloc settings.
FRONT_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(32 << 20),
                 MALLOC_TRIM_THRESHOLD_=str(64 << 20))


class Stack:
    """A backend and its front end (nginx, or HAProxy), on loopback."""

    def __init__(self, backend, workers=1, front='nginx', app='bench'):
        self.dir = tempfile.mkdtemp(prefix='gevent-fastcgi-bench-')
        os.chmod(self.dir, 0o777)
        self.backend_port = free_port()
        self.port = free_port()
        argv, cwd, env, protocol = backend_command(
            backend, self.backend_port, workers, app)
        self.backend = subprocess.Popen(argv, cwd=cwd, env=env,
                                        stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_port(self.backend_port, self.backend)
        if front == 'haproxy':
            conf = os.path.join(self.dir, 'haproxy.cfg')
            with open(conf, 'w') as f:
                f.write(HAPROXY_CONF.format(dir=self.dir, port=self.port,
                                            backend_port=self.backend_port))
            self.front = subprocess.Popen([which('haproxy'), '-f', conf,
                                           '-db'], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
        else:
            if protocol == 'http':
                location, keepalive = HTTP_LOCATION, 'keepalive 64;'
            elif protocol == 'uwsgi':       # (nginx keeps no uwsgi connection)
                location, keepalive = UWSGI_LOCATION, ''
            elif protocol == 'fastcgi':
                location = FASTCGI_LOCATION.format(
                    keep_conn='fastcgi_keep_conn on;')
                keepalive = 'keepalive 64;'
            else:
                location, keepalive = FASTCGI_LOCATION.format(keep_conn=''), ''
            conf = os.path.join(self.dir, 'nginx.conf')
            with open(conf, 'w') as f:
                f.write(NGINX_CONF.format(
                    dir=self.dir, port=self.port, location=location,
                    backend_port=self.backend_port, keepalive=keepalive,
                    user='user nobody nogroup;' if os.geteuid() == 0 else ''))
            self.front = subprocess.Popen([which('nginx'), '-p', self.dir,
                                           '-c', conf], env=FRONT_ENV)
        wait_for_port(self.port, self.front)
        time.sleep(0.5)             # let workers finish starting

    def stop(self):
        for proc in (self.front, self.backend):
            proc.send_signal(signal.SIGTERM)
        for proc in (self.front, self.backend):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- workloads ----------------------------------------------------------------

UPLOAD_LUA = """
wrk.method = "POST"
wrk.body = string.rep("x", 1048576)
wrk.headers["Content-Type"] = "application/octet-stream"
"""

class Workload(NamedTuple):
    path: str
    connections: int
    threads: int            # wrk's
    lua: Optional[str]      # wrk's script
    backends: List[str]
    workers: int
    front: str              # nginx or haproxy
    app: str = 'bench'      # of APPS


# What users run first (one worker each, wrk -t1 as a user would try it),
# then the hello and size workloads of bench_app.py.
REAL = ['ours', 'uwsgi-native', 'uwsgi-fastcgi', 'gunicorn']
PYTHON = ['ours', 'original', 'flup', 'uwsgi-fastcgi', 'gunicorn']
PEERS_GEVENT = ['ours', 'uwsgi-fastcgi', 'gunicorn']
WORKLOADS = {
    'flask-c50': Workload('/flask/item/7', 50, 1, None,
                          REAL + ['ours-visible'], 1, 'nginx', 'flask'),
    'flask-c1': Workload('/flask/item/7', 1, 1, None, REAL, 1, 'nginx',
                         'flask'),
    'django-c50': Workload('/django/rows', 50, 1, None,
                           REAL + ['ours-visible'], 1, 'nginx', 'django'),
    'django-c1': Workload('/django/rows', 1, 1, None, REAL, 1, 'nginx',
                          'django'),
    'stream-c50': Workload('/stream', 50, 1, None, REAL, 1, 'nginx'),
    'hello-c1': Workload('/hello', 1, 1, None, PYTHON + ['libfcgi'], 1,
                         'nginx'),
    'hello-c50': Workload('/hello', 50, 2, None,
                          PYTHON + ['ours-visible', 'libfcgi'], 1, 'nginx'),
    '64k-c20': Workload('/64k', 20, 2, None, PYTHON, 1, 'nginx'),
    '1m-c10': Workload('/1m', 10, 2, None, PYTHON, 1, 'nginx'),
    'upload1m-c10': Workload('/upload', 10, 2, UPLOAD_LUA,
                             PYTHON + ['libfcgi'], 1, 'nginx'),
    'sleep100ms-c500': Workload('/sleep', 500, 2, None,
                                PEERS_GEVENT + ['original'], 1, 'nginx'),
    'hello-c50-2workers': Workload('/hello', 50, 2, None, PEERS_GEVENT, 2,
                                   'nginx'),
    'hello-c50-haproxy-mpx': Workload('/hello', 50, 2, None, ['ours'], 1,
                                      'haproxy'),
    # CPU-bound: the backend is the cap (its CPU use is reported), so a
    # second worker can show what it adds
    'cpu-c50': Workload('/cpu', 50, 2, None, PEERS_GEVENT, 1, 'nginx'),
    'cpu-c50-2workers': Workload('/cpu', 50, 2, None, PEERS_GEVENT, 2,
                                 'nginx'),
}
REAL_WORKLOADS = [name for name, workload in WORKLOADS.items()
                  if workload.app != 'bench' or workload.path == '/stream']


def parse_wrk(text):
    def number(pattern, default=0.0):
        match = re.search(pattern, text)
        return float(match.group(1)) if match else default
    latency = re.search(r'50%\s+([\d.]+)(us|ms|s)\b', text)
    median = None
    if latency:
        median = float(latency.group(1)) * {'us': 1, 'ms': 1e3,
                                            's': 1e6}[latency.group(2)]
    errors = sum(int(n) for n in re.findall(
        r'(?:connect|read|write|timeout) (\d+)', text))
    requests = int(number(r'(\d+) requests in'))
    non2xx = int(number(r'Non-2xx or 3xx responses: (\d+)'))
    rps = number(r'Requests/sec:\s+([\d.]+)')
    # wrk counts error responses (a 502 from nginx) as requests: throughput
    # is of the ones that succeeded
    return {'requests': requests,
            'rps': rps * (requests - non2xx) / requests if requests else 0.0,
            'wrk_rps': rps,
            'p50_us': median,
            'non2xx': non2xx,
            'socket_errors': errors}


def run_wrk(port, path, connections, threads, lua, duration):
    argv = [which('wrk'), '-t%d' % threads, '-c%d' % connections,
            '-d%ds' % duration, '--latency', '--timeout', '10s']
    if lua:
        script = os.path.join(tempfile.gettempdir(), 'bench-upload.lua')
        with open(script, 'w') as f:
            f.write(lua)
        argv += ['-s', script]
    argv.append('http://127.0.0.1:%d%s' % (port, path))
    return subprocess.run(argv, capture_output=True, text=True).stdout


def idle_seconds():
    """Seconds all cores spent idle so far (idle + iowait, /proc/stat)."""
    with open('/proc/stat') as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / TICK


def measure(stack, workload, duration):
    path, connections, threads, lua = WORKLOADS[workload][:4]
    run_wrk(stack.port, path, connections, threads, lua, 1)       # warm up
    pids = process_tree(stack.backend.pid)
    front_pids = process_tree(stack.front.pid)
    before = cpu_seconds(pids)
    front_before = cpu_seconds(front_pids)
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    idle_before = idle_seconds()
    started = time.monotonic()
    result = parse_wrk(run_wrk(stack.port, path, connections, threads, lua,
                               duration))
    elapsed = time.monotonic() - started
    used = cpu_seconds(pids) - before
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    nginx_used = cpu_seconds(front_pids) - front_before
    front_used = (nginx_used + wrk_after.ru_utime - wrk_before.ru_utime
                  + wrk_after.ru_stime - wrk_before.ru_stime)
    served = result['requests']
    result['cpu_us_per_request'] = used / served * 1e6 if served else None
    # cores the backend kept busy: near 1 per worker means the backend,
    # not nginx or wrk, is what limits the run
    result['backend_cores_busy'] = used / duration
    # what the front end (nginx or HAProxy, and wrk) costs per request, and
    # the cores nobody used: with these, how far any backend could go
    result['front_cpu_us_per_request'] = (front_used / served * 1e6
                                          if served else None)
    # the web server alone (nginx or HAProxy, not wrk)
    result['nginx_cpu_us_per_request'] = (nginx_used / served * 1e6
                                          if served else None)
    result['idle_cores'] = (idle_seconds() - idle_before) / elapsed
    return result


def app_floor(workload):
    """The application's own CPU us per request (floor.py), run by the
    Python ours runs on."""
    out = subprocess.run([sys.executable, os.path.join(HERE, 'floor.py'),
                          APPS[workload.app], workload.path, '2'],
                         capture_output=True, text=True, check=True, cwd=HERE)
    return float(out.stdout)


# -- memory ------------------------------------------------------------------

def memory_ours():
    """RSS per idle kept-open connection (10,000 of them), and the peak RSS
    growth while one 100 MB upload streams in."""
    sys.path.insert(0, ROOT)
    import gevent_fastcgi as fcgi
    port = free_port()
    argv, cwd, env, _ = backend_command('ours', port, 1)
    # room for all 10,000 connections at once (the default is 1,024)
    argv[argv.index('--max-conns') + 1] = '20000'
    proc = subprocess.Popen(argv, cwd=cwd, env=env)
    wait_for_port(port, proc)
    request = (fcgi.encode_begin_request(1, keep_conn=True)
               + fcgi.encode_records(fcgi.FCGI_PARAMS, 1, fcgi.encode_pairs(
                   {'REQUEST_METHOD': 'GET', 'PATH_INFO': '/hello'}))
               + fcgi.encode_records(fcgi.FCGI_PARAMS, 1)
               + fcgi.encode_records(fcgi.FCGI_STDIN, 1))
    results = {}
    try:
        time.sleep(0.5)
        base = rss_kb(proc.pid)
        conns = []
        for _ in range(10000):
            sock = socket.create_connection(('127.0.0.1', port))
            sock.sendall(request)
            parser = fcgi.RecordParser()
            while not any(rtype == fcgi.FCGI_END_REQUEST for rtype, _, _
                          in parser.feed(sock.recv(65536))):
                pass
            conns.append(sock)
        time.sleep(1.0)
        with_conns = rss_kb(proc.pid)
        results['idle_connections'] = 10000
        results['rss_per_idle_connection_kb'] = (with_conns - base) / 10000
        for sock in conns:
            sock.close()
        time.sleep(1.0)
        # one 100 MB upload, sampled every 5 ms
        base = rss_kb(proc.pid)
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_kb(proc.pid))
                time.sleep(0.005)
        sampler = threading.Thread(target=sample)
        sampler.start()
        size = 100 * 1024 * 1024
        sock = socket.create_connection(('127.0.0.1', port))
        sock.sendall(fcgi.encode_begin_request(1, keep_conn=True)
                     + fcgi.encode_records(fcgi.FCGI_PARAMS, 1,
                                           fcgi.encode_pairs({
                                               'REQUEST_METHOD': 'POST',
                                               'PATH_INFO': '/upload',
                                               'CONTENT_LENGTH': str(size)}))
                     + fcgi.encode_records(fcgi.FCGI_PARAMS, 1))
        chunk = fcgi.encode_records(fcgi.FCGI_STDIN, 1, b'u' * 65535)
        sent = 0
        while sent < size:
            step = min(65535, size - sent)
            sock.sendall(chunk if step == 65535 else fcgi.encode_records(
                fcgi.FCGI_STDIN, 1, b'u' * step))
            sent += step
        sock.sendall(fcgi.encode_records(fcgi.FCGI_STDIN, 1))
        parser, body = fcgi.RecordParser(), b''
        while True:
            records = parser.feed(sock.recv(65536))
            body += b''.join(content for rtype, _, content in records
                             if rtype == fcgi.FCGI_STDOUT)
            if any(rtype == fcgi.FCGI_END_REQUEST for rtype, _, _ in records):
                break
        done.set()
        sampler.join()
        sock.close()
        assert body.endswith(str(size).encode()), body[-40:]
        results['upload_mb'] = 100
        results['upload_peak_rss_growth_kb'] = peak[0] - base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    return results


# -- report ------------------------------------------------------------------

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(raw):
    table = {}
    for (workload, backend), runs in raw.items():
        errors = sum(r['non2xx'] + r['socket_errors'] for r in runs)
        requests = sum(r['requests'] for r in runs)
        cell = {'rps': median(r['rps'] for r in runs),
                'cpu_us': median(r['cpu_us_per_request'] for r in runs),
                'p50_us': median(r['p50_us'] for r in runs),
                'cores': median(r.get('backend_cores_busy') for r in runs),
                'front_us': median(r.get('front_cpu_us_per_request')
                                   for r in runs),
                'nginx_us': median(r.get('nginx_cpu_us_per_request')
                                   for r in runs),
                # the whole stack, backend and web server, round by round
                'stack_us': median(
                    r['cpu_us_per_request'] + r['nginx_cpu_us_per_request']
                    if r['cpu_us_per_request'] is not None
                    and r.get('nginx_cpu_us_per_request') is not None
                    else None for r in runs),
                'idle': median(r.get('idle_cores') for r in runs),
                'errors': errors, 'requests': requests,
                'rounds': len(runs),
                # a backend that fails most requests has no speed to speak of
                'failed': requests == 0 or errors * 2 > requests}
        if cell['failed']:
            cell['rps'] = cell['cpu_us'] = cell['p50_us'] = None
        table.setdefault(workload, {})[backend] = cell
    return table


def ratio(a, b):
    return a / b if a is not None and b else None


def targets(table, memory):
    """The targets of the benchmark issues: (description, value, goal, met)."""
    checks = []

    def get(workload, backend, key):
        return table.get(workload, {}).get(backend, {}).get(key)

    def check(name, value, goal, ok):
        checks.append((name, value, goal, ok))

    def at_least(name, value, goal):
        check(name, value, '>= %g' % goal, value is not None and value >= goal)

    def at_most(name, value, goal):
        check(name, value, '<= %g' % goal, value is not None and value <= goal)

    # what users run (issue "Real applications answer at once")
    for app, rps_goal, cpu_goal in (('flask', 1.2, 0.75),
                                    ('django', 1.1, 0.85)):
        busy, one = app + '-c50', app + '-c1'
        at_least('%s: requests/s vs uWSGI native' % busy, ratio(
            get(busy, 'ours', 'rps'), get(busy, 'uwsgi-native', 'rps')),
            rps_goal)
        at_most('%s: backend CPU/request vs uWSGI native' % busy, ratio(
            get(busy, 'ours', 'cpu_us'), get(busy, 'uwsgi-native', 'cpu_us')),
            cpu_goal)
        at_least('%s: requests/s vs gunicorn' % busy, ratio(
            get(busy, 'ours', 'rps'), get(busy, 'gunicorn', 'rps')), 1)
        at_most('%s: median latency vs uWSGI native' % one, ratio(
            get(one, 'ours', 'p50_us'), get(one, 'uwsgi-native', 'p50_us')),
            1)
        at_most('%s: stack CPU, status page and access log on' % busy, ratio(
            get(busy, 'ours-visible', 'stack_us'),
            get(busy, 'ours', 'stack_us')), 1.1)

    uwsgi = 'uwsgi-fastcgi'
    hello = 'hello-c50'
    r = ratio(get(hello, 'ours', 'cpu_us'), get(hello, uwsgi, 'cpu_us'))
    check('hello c50: CPU/request vs uWSGI', r, '<= 0.5', r is not None and
          r <= 0.5)
    r = ratio(get(hello, 'ours', 'cpu_us'), get(hello, 'original', 'cpu_us'))
    check('hello c50: CPU/request vs original', r, '<= 0.35',
          r is not None and r <= 0.35)
    r = ratio(get(hello, 'ours', 'rps'), get(hello, uwsgi, 'rps'))
    check('hello c50: requests/s vs uWSGI', r, '>= 2', r is not None and
          r >= 2)
    r = ratio(get('hello-c1', 'ours', 'p50_us'),
              get('hello-c1', uwsgi, 'p50_us'))
    check('hello c1: median latency vs uWSGI', r, '<= 1', r is not None and
          r <= 1)
    for workload in ('64k-c20', '1m-c10', 'upload1m-c10'):
        r = ratio(get(workload, 'ours', 'rps'), get(workload, uwsgi, 'rps'))
        check('%s: throughput vs uWSGI' % workload, r, '>= 1.5',
              r is not None and r >= 1.5)
    rps = get('sleep100ms-c500', 'ours', 'rps')
    errors = get('sleep100ms-c500', 'ours', 'errors')
    r = ratio(rps, 500 / 0.1)
    check('100 ms app, 500 clients: of 5000 req/s, errors %s' % errors, r,
          '>= 0.9, no errors', r is not None and r >= 0.9 and not errors)
    r = ratio(get('cpu-c50-2workers', 'ours', 'rps'), get('cpu-c50', 'ours',
                                                          'rps'))
    busy = get('cpu-c50', 'ours', 'cores')
    check('2 workers vs 1, CPU-bound app (1 worker kept %s cores busy)'
          % fmt(busy, 2), r, '>= 1.6', r is not None and r >= 1.6)
    if memory:
        v = memory.get('rss_per_idle_connection_kb')
        check('RSS per idle connection (KB)', v, '<= 20',
              v is not None and v <= 20)
        v = memory.get('upload_peak_rss_growth_kb')
        check('100 MB upload: peak RSS growth (KB)', v,
              '<= spool 1024 + 5120', v is not None and v <= 1024 + 5120)
    return checks


def fmt(value, digits=0):
    if value is None:
        return '-'
    return ('%.' + str(digits) + 'f') % value


def table_lines(table, backends, cell_text):
    """A header and one row per workload; cell_text(cell) fills a cell."""
    lines = ['%-22s' % 'workload' + ''.join('%-22s' % b for b in backends)]
    for workload in WORKLOADS:
        if workload in table and workload not in REAL_WORKLOADS:
            lines.append('%-22s' % workload + ''.join(
                '%-22s' % ('-' if table[workload].get(backend) is None
                           else cell_text(table[workload][backend]))
                for backend in backends))
    return lines


def speed_text(cell):
    if cell['failed']:
        return ('none answered' if not cell['requests']
                else 'failed (%d errors)' % cell['errors'])
    return '%s|%s|%s%s' % (fmt(cell['rps']), fmt(cell['cpu_us']),
                           fmt(cell['p50_us']),
                           ' E%d' % cell['errors'] if cell['errors'] else '')


def front_text(cell):
    if cell['failed']:
        return '-'
    return '%s|%s' % (fmt(cell.get('front_us')), fmt(cell.get('idle'), 2))


def floor_us(floors, workload):
    return median(floors.get(workload, ()))


def real_lines(table, floors):
    """A row per real application and backend: what README.rst shows."""
    lines = ['%-12s %-14s %8s %9s %9s %8s %9s %9s' % (
        'workload', 'backend', 'req/s', 'backend', 'overhead', 'nginx',
        'total', 'p50'), '%-12s %-14s %8s %9s %9s %8s %9s %9s' % (
        '', '', '', 'CPU us', 'over app', 'CPU us', 'CPU us', 'ms')]
    for workload in REAL_WORKLOADS:
        floor = floor_us(floors, workload)
        if workload not in table:
            continue
        lines.append('%-12s app floor: %s us of CPU per request, called '
                     'in-process' % (workload, fmt(floor)))
        for backend in ['ours', 'ours-visible', 'baseline',
                        'baseline-visible'] + REAL[1:]:
            cell = table[workload].get(backend)
            if cell is None:
                continue
            if cell['failed']:
                lines.append('%-12s %-14s %s' % ('', backend,
                                                 speed_text(cell)))
                continue
            overhead = (cell['cpu_us'] - floor if floor is not None
                        and cell['cpu_us'] is not None else None)
            lines.append('%-12s %-14s %8s %9s %9s %8s %9s %9s%s' % (
                '', backend, fmt(cell['rps']), fmt(cell['cpu_us']),
                fmt(overhead), fmt(cell['nginx_us']), fmt(cell['stack_us']),
                fmt(cell['p50_us'] and cell['p50_us'] / 1000, 2),
                ' E%d' % cell['errors'] if cell['errors'] else ''))
    return lines


def report(table, checks, info, floors=None):
    backends = ['ours', 'ours-visible', 'original', 'flup', 'uwsgi-fastcgi',
                'gunicorn', 'libfcgi']
    if any('baseline' in cells for cells in table.values()):
        backends[2:2] = ['baseline', 'baseline-visible']
    lines = []
    if any(workload in table for workload in REAL_WORKLOADS):
        lines += ['What users run, behind nginx (medians of %d rounds):'
                  % info['rounds'], '']
        lines += real_lines(table, floors or {}) + ['']
    lines += ['successful requests/s | CPU us per request | median latency us '
              '(medians of %d rounds)' % info['rounds'], '']
    lines += table_lines(table, backends, speed_text)
    lines += ['', 'front end (nginx or HAProxy, and wrk): CPU us per request '
              '| cores left idle', '']
    lines += table_lines(table, backends, front_text)
    lines += ['', 'targets:']
    for name, value, goal, ok in checks:
        lines.append('  %-50s %8s  goal %-28s %s' % (
            name, fmt(value, 2), goal, 'MET' if ok else
            'not measurable' if value is None else 'NOT MET'))
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Benchmark gevent_fastcgi against its peers.')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--duration', type=int, default=8,
                        help='seconds of each wrk run (default 8)')
    parser.add_argument('--only', action='append', choices=sorted(WORKLOADS),
                        help='run only these workloads (repeatable)')
    parser.add_argument('--backends', help='comma-separated subset')
    parser.add_argument('--real', action='store_true',
                        help='only what users run: Flask, Django, a stream')
    parser.add_argument('--no-memory', action='store_true')
    parser.add_argument('--install-debs', action='store_true')
    parser.add_argument('--memory-only', action='store_true',
                        help='only the memory figures of ours')
    parser.add_argument('--from-log', metavar='FILE',
                        help='no measuring: the report of the "round" lines '
                             'an earlier run printed')
    parser.add_argument('--json', help='write raw results to this file')
    parser.add_argument('--baseline', metavar='DIR', help="another checkout "
                        "of ours (git worktree add DIR COMMIT), run as "
                        "'baseline' (and 'baseline-visible') beside 'ours'")
    args = parser.parse_args(argv)
    if args.baseline:
        global BASELINE
        BASELINE = os.path.abspath(args.baseline)
        for workload, spec in WORKLOADS.items():
            WORKLOADS[workload] = spec._replace(backends=spec.backends + [
                name.replace('ours', 'baseline') for name in spec.backends
                if name in ('ours', 'ours-visible')])
    if args.from_log:
        raw, info, floors = {}, {'rounds': 0}, {}
        with open(args.from_log) as f:
            for line in f:
                match = re.match(r'round (\d+) (\S+)\s+(\S+)\s+(\{.*\})$',
                                 line.strip())
                floor = re.match(r'floor (\S+) ([\d.]+)$', line.strip())
                if match:
                    raw.setdefault((match.group(2), match.group(3)),
                                   []).append(json.loads(match.group(4)))
                    info['rounds'] = max(info['rounds'], int(match.group(1)))
                elif floor:
                    floors.setdefault(floor.group(1), []).append(
                        float(floor.group(2)))
                elif line.startswith('memory: '):
                    info['memory'] = json.loads(line[len('memory: '):])
        table = summarize(raw)
        print(report(table, targets(table, info.get('memory')), info, floors))
        return 0
    setup(args.install_debs)
    if args.memory_only:
        print('memory: %s' % json.dumps(memory_ours()), flush=True)
        return 0
    info = {'versions': versions(), 'rounds': args.rounds,
            'duration': args.duration, 'cpus': os.cpu_count(),
            'machine': os.uname().machine}
    print(json.dumps(info), flush=True)
    workloads = args.only or (REAL_WORKLOADS if args.real
                              else list(WORKLOADS))
    wanted = set(args.backends.split(',')) if args.backends else None
    # (backend, workers, front, app) -> workloads it runs
    stacks = {}
    for workload in workloads:
        spec = WORKLOADS[workload]
        for backend in spec.backends:
            if wanted is None or backend in wanted:
                stacks.setdefault((backend, spec.workers, spec.front,
                                   spec.app), []).append(workload)
    raw, floors = {}, {}
    for round_number in range(args.rounds):
        for workload in workloads:
            if workload in REAL_WORKLOADS:
                value = app_floor(WORKLOADS[workload])
                floors.setdefault(workload, []).append(value)
                print('floor %s %.2f' % (workload, value), flush=True)
        # alternate the order between rounds, so that no backend always
        # runs first (or last) on a noisy machine
        order = sorted(stacks)
        if round_number % 2:
            order.reverse()
        for key in order:
            backend, workers, front, app = key
            stack = Stack(backend, workers, front, app)
            try:
                for workload in stacks[key]:
                    result = measure(stack, workload, args.duration)
                    raw.setdefault((workload, backend), []).append(result)
                    print('round %d %-22s %-9s %s' % (
                        round_number + 1, workload, backend,
                        json.dumps(result)), flush=True)
            finally:
                stack.stop()
    memory = None if args.no_memory else memory_ours()
    if memory:
        print('memory: %s' % json.dumps(memory), flush=True)
    table = summarize(raw)
    checks = targets(table, memory)
    print()
    print(report(table, checks, info, floors))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'info': info, 'table': table, 'memory': memory,
                       'targets': checks,
                       'raw': {'%s %s' % k: v for k, v in raw.items()}}, f,
                      indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
