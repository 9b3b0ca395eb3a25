"""The Django project of bench/bench.py in one module: startproject's
settings and middleware (DEBUG off), one view rendering a template that
loops over 20 rows; django_app.py is its WSGI entry."""
import os

from django.shortcuts import render
from django.urls import path

BASE_DIR = os.path.dirname(os.path.abspath(__file__))
SECRET_KEY = 'bench-only-not-secret'
DEBUG = False
ALLOWED_HOSTS = ['127.0.0.1', 'localhost']
INSTALLED_APPS = [
    'django.contrib.admin',
    'django.contrib.auth',
    'django.contrib.contenttypes',
    'django.contrib.sessions',
    'django.contrib.messages',
    'django.contrib.staticfiles',
]
MIDDLEWARE = [
    'django.middleware.security.SecurityMiddleware',
    'django.contrib.sessions.middleware.SessionMiddleware',
    'django.middleware.common.CommonMiddleware',
    'django.middleware.csrf.CsrfViewMiddleware',
    'django.contrib.auth.middleware.AuthenticationMiddleware',
    'django.contrib.messages.middleware.MessageMiddleware',
    'django.middleware.clickjacking.XFrameOptionsMiddleware',
]
ROOT_URLCONF = 'django_settings'
TEMPLATES = [{
    'BACKEND': 'django.template.backends.django.DjangoTemplates',
    'DIRS': [os.path.join(BASE_DIR, 'templates')],
    'APP_DIRS': True,
    'OPTIONS': {'context_processors': [
        'django.template.context_processors.request',
        'django.contrib.auth.context_processors.auth',
        'django.contrib.messages.context_processors.messages',
    ]},
}]
DATABASES = {'default': {'ENGINE': 'django.db.backends.sqlite3',
                         'NAME': ':memory:'}}
USE_TZ = True
STATIC_URL = 'static/'
DEFAULT_AUTO_FIELD = 'django.db.models.BigAutoField'

ROWS = [{'id': n, 'name': 'row %d' % n, 'price': n * 2.5, 'even': n % 2 == 0}
        for n in range(20)]


def rows(request):
    return render(request, 'rows.html', {'rows': ROWS, 'title': 'Rows'})


urlpatterns = [path('django/rows', rows)]
