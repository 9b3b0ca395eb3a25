"""The day traffic doubles: one worker behind nginx, an application that
burns 4 ms of CPU per request, offered twice what it can serve by an
open-loop client (requests leave on a schedule, whether or not earlier ones
were answered: as users arrive), with a 5 s client timeout; health checks
(/ping) through nginx meanwhile, and for ours directly over FastCGI too.

    python3 bench/overload.py                      # ours, then gunicorn
    python3 bench/overload.py --rounds 3 --backends ours

Each backend runs with its defaults (ours: --ping-path /ping, which
gunicorn has no equal of: its /ping is the application's hello).  First
the capacity is measured (closed loop, 8 clients, 5 s), then the offered
rate is --factor times it.  Reported per backend: requests sent, answered
200, answered 503, failed otherwise, timed out; p50 and p99 of the 200s and
of the 503s; the 200s as a share of capacity x duration; the slowest ping
and how many took over 0.5 s.  bench.py's setup (nginx, the peers' virtual
environment) is used: run bench.py once first, or --install-debs here.
"""
import argparse
import json
import os
import statistics
import sys
import time

import gevent
import gevent.socket

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
from bench import ROOT, Stack, peer  # noqa: E402

sys.path.insert(0, ROOT)
import gevent_fastcgi  # noqa: E402


def backend_command(name, port, workers, app='bench'):
    """Defaults only: what an operator gets without tuning."""
    clean_env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    address = '127.0.0.1:%d' % port
    if name == 'ours':
        return ([sys.executable, '-m', 'gevent_fastcgi', '--bind', address,
                 '--log-level', 'warning', '--ping-path', '/ping',
                 '--chdir', HERE, 'bench_app:app'], ROOT,
                dict(clean_env, PYTHONPATH=ROOT), 'fastcgi')
    if name == 'gunicorn':
        return ([peer('gunicorn'), '-k', 'gevent', '-w', '1', '-b', address,
                 '--log-level', 'warning', 'bench_app:app'], HERE, clean_env,
                'http')
    raise ValueError(name)


def http_get(port, path, timeout):
    """(status, seconds) of one GET through nginx on a new connection;
    status 0 for a timeout, -1 for a failed connection."""
    started = time.monotonic()
    status = -1
    try:
        with gevent.Timeout(timeout):
            sock = gevent.socket.create_connection(('127.0.0.1', port))
            try:
                sock.sendall(b'GET %s HTTP/1.1\r\nHost: bench\r\n'
                             b'Connection: close\r\n\r\n' % path.encode())
                data = b''
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            finally:
                sock.close()
        status = int(data.split(b' ', 2)[1]) if data else -1
    except gevent.Timeout:
        status = 0
    except (OSError, ValueError, IndexError):
        status = -1
    return status, time.monotonic() - started


def capacity(port, seconds=5.0, clients=8):
    """Requests per second served closed-loop: what one worker can do."""
    done = []
    deadline = time.monotonic() + seconds

    def client():
        while time.monotonic() < deadline:
            status, _ = http_get(port, '/burn', 10)
            if status == 200:
                done.append(1)
    started = time.monotonic()
    gevent.joinall([gevent.spawn(client) for _ in range(clients)])
    return len(done) / (time.monotonic() - started)


def ping_fastcgi(address, timeout):
    """A /ping straight to the backend over FastCGI (blocking, in a thread
    of gevent's pool: our client is a plain socket one)."""
    started = time.monotonic()
    try:
        gevent.get_hub().threadpool.apply(
            gevent_fastcgi.fastcgi_request, (address, '/ping'),
            {'timeout': timeout})
    except Exception:
        return timeout
    return time.monotonic() - started


def offer(stack, rate, duration, timeout, direct):
    """Open loop: request i leaves at start + i / rate."""
    results = []
    pings = []
    fastcgi_pings = []

    def one():
        results.append(http_get(stack.port, '/burn', timeout))

    def pinger():
        while time.monotonic() < end:
            pings.append(http_get(stack.port, '/ping', timeout)[1])
            if direct:
                fastcgi_pings.append(ping_fastcgi(
                    ('127.0.0.1', stack.backend_port), timeout))
            gevent.sleep(0.5)
    start = time.monotonic()
    end = start + duration
    greenlets = [gevent.spawn(pinger)]
    sent = 0
    while True:
        due = start + sent / rate
        if due >= end:
            break
        delay = due - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        greenlets.append(gevent.spawn(one))
        sent += 1
    gevent.joinall(greenlets)
    return results, pings, fastcgi_pings


def percentile(values, share):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(share * len(values)))]


def summary(results, pings, fastcgi_pings, cap, duration):
    ok = [t for status, t in results if status == 200]
    shed = [t for status, t in results if status == 503]
    return {
        'capacity_rps': round(cap, 1), 'sent': len(results),
        'ok': len(ok), 'shed_503': len(shed),
        'timed_out': sum(1 for status, _ in results if status == 0),
        'other': sum(1 for status, _ in results
                     if status not in (0, 200, 503)),
        'ok_share_of_capacity': round(len(ok) / (cap * duration), 3),
        'ok_p50_s': percentile(ok, 0.5), 'ok_p99_s': percentile(ok, 0.99),
        'shed_p50_s': percentile(shed, 0.5),
        'shed_p99_s': percentile(shed, 0.99),
        'pings': len(pings), 'ping_max_s': max(pings, default=None),
        'pings_over_half_s': sum(1 for t in pings if t > 0.5),
        'fastcgi_pings': len(fastcgi_pings),
        'fastcgi_ping_max_s': max(fastcgi_pings, default=None),
        'fastcgi_pings_over_half_s': sum(1 for t in fastcgi_pings
                                         if t > 0.5)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--backends', default='ours,gunicorn')
    parser.add_argument('--rounds', type=int, default=1)
    parser.add_argument('--duration', type=float, default=15.0)
    parser.add_argument('--factor', type=float, default=2.0,
                        help='offered rate / measured capacity')
    parser.add_argument('--timeout', type=float, default=5.0,
                        help="the client's timeout, seconds")
    parser.add_argument('--install-debs', action='store_true')
    parser.add_argument('--json', help='write the results to this file')
    args = parser.parse_args(argv)
    bench.setup(args.install_debs)
    bench.backend_command = backend_command
    results = {}
    for round_number in range(args.rounds):
        for name in args.backends.split(','):
            stack = Stack(name)
            try:
                cap = capacity(stack.port)
                raw = offer(stack, cap * args.factor, args.duration,
                            args.timeout, direct=name == 'ours')
            finally:
                stack.stop()
            row = summary(*raw, cap, args.duration)
            results.setdefault(name, []).append(row)
            print('round %d %s %s' % (round_number + 1, name,
                                      json.dumps(row)), flush=True)
            time.sleep(1)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    for name, rows in results.items():
        print('%-9s' % name, ' '.join(
            '%s=%s' % (key, statistics.median(
                row[key] for row in rows if row[key] is not None)
                if any(row[key] is not None for row in rows) else '-')
            for key in rows[0]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
