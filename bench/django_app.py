"""WSGI entry of the Django project in django_settings.py."""
import os

os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'django_settings')

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
