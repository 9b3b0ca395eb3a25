"""CI: gevent_fastcgi.py copied alone into an empty folder and run by a
Python whose environment has gevent and nothing else of ours (no Django,
PasteDeploy, pytest): it imports, serves a request to the built-in client,
and answers ``python -m gevent_fastcgi --version``.  Exits non-zero if not.
"""
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = '''
import sys, gevent
import gevent_fastcgi as fcgi
assert fcgi.__file__.startswith(sys.path[0]), fcgi.__file__
server = fcgi.FastCGIServer(('127.0.0.1', 0),
                            fcgi.WSGIRequestHandler(fcgi.demo_app))
server.start()
out, err, app_status, status = gevent.get_hub().threadpool.apply(
    fcgi.fastcgi_request, (server.address, '/vendored'))
assert fcgi.response_status(out) == 200 and b'/vendored' in out, out[:300]
print('vendored: gevent %s, Python %s: served %d bytes'
      % (gevent.__version__, sys.version.split()[0], len(out)))
'''

with tempfile.TemporaryDirectory() as folder:
    shutil.copy(os.path.join(HERE, 'gevent_fastcgi.py'), folder)
    env = {key: value for key, value in os.environ.items()
           if key != 'PYTHONPATH'}
    subprocess.run([sys.executable, '-c', SERVE], cwd=folder, env=env,
                   check=True, timeout=60)
    version = subprocess.run(
        [sys.executable, '-m', 'gevent_fastcgi', '--version'], cwd=folder,
        env=env, check=True, capture_output=True, text=True, timeout=60)
    print('vendored:', version.stdout.strip())
