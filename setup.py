import re

from setuptools import setup

with open('gevent_fastcgi.py', encoding='utf-8') as f:
    version = re.search(r"^__version__ = '([^']+)'", f.read(), re.M).group(1)
with open('README.rst', encoding='utf-8') as f:
    long_description = f.read()

setup(
    name='gevent_fastcgi',
    version=version,
    description='FastCGI application server for Python (WSGI) built on gevent',
    long_description=long_description,
    long_description_content_type='text/x-rst',
    license='MIT',
    py_modules=['gevent_fastcgi'],
    # What .ci/versions proves: README.rst's table of supported versions.
    python_requires='>=3.9',
    install_requires=['gevent>=21.1.2'],
    extras_require={
        'paste': ['PasteDeploy>=2.1.1'],
        'django': ['Django>=4.2'],
        'zope': ['zope.interface>=5.4'],
        'test': ['pytest', 'hypothesis', 'prometheus_client',
                 'zope.interface', 'PasteDeploy', 'pyramid', 'Django>=4.2'],
    },
    entry_points={
        'console_scripts': ['gevent-fastcgi = gevent_fastcgi:main'],
        'paste.server_runner': [
            'wsgi = gevent_fastcgi:run_wsgi',
            'wsgiref = gevent_fastcgi:run_wsgiref',
            'fastcgi = gevent_fastcgi:run_fastcgi',
        ],
    },
    classifiers=[
        'Development Status :: 4 - Beta',
        'Environment :: Web Environment',
        'Framework :: Django',
        'Framework :: Paste',
        'License :: OSI Approved :: MIT License',
        'Operating System :: POSIX',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.9',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Programming Language :: Python :: 3.13',
        'Topic :: Internet :: WWW/HTTP :: WSGI :: Server',
    ],
)
