"""What bench.py and soak.py share: ports, processes, memory, and the
FastCGI parameters nginx sends."""
import os
import shutil
import socket
import time

#: the fastcgi_param lines of every nginx location that passes to a backend
FASTCGI_PARAMS = """\
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param CONTENT_TYPE $content_type;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param SCRIPT_NAME "";
            fastcgi_param PATH_INFO $uri;
            fastcgi_param REQUEST_URI $request_uri;
            fastcgi_param SERVER_PROTOCOL $server_protocol;
            fastcgi_param SERVER_NAME $server_name;
            fastcgi_param SERVER_PORT $server_port;
            fastcgi_param REMOTE_ADDR $remote_addr;
"""


#: the lines of nginx's http block that keep its temporary files in the
#: folder of its own it runs from ({dir}), and take bodies of any size
NGINX_TEMP_PATHS = """\
    client_body_temp_path {dir}/body;
    fastcgi_temp_path {dir}/fastcgi;
    proxy_temp_path {dir}/proxy;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 0;
"""


def which(tool):
    return shutil.which(tool) or (os.path.exists('/usr/sbin/' + tool)
                                  and '/usr/sbin/' + tool)


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def wait_for_port(port, proc=None, timeout=30, host='127.0.0.1'):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError('exited with status %s' % proc.returncode)
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError('nothing listens on %s:%d' % (host, port))


def children(pid):
    try:
        with open('/proc/%d/task/%d/children' % (pid, pid)) as f:
            return sorted(int(p) for p in f.read().split())
    except FileNotFoundError:
        return []


def process_tree(pid):
    pids = [pid]
    for child in pids:
        pids.extend(children(child))
    return pids


def rss_kb(pid):
    try:
        with open('/proc/%d/status' % pid) as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0
