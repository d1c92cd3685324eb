# Porthole for a team: uvicorn on PostgreSQL and Redis against the OpenComputer cloud
# (set DATABASE_URL, REDIS_URL, OPENCOMPUTER_API_URL, OPENCOMPUTER_API_KEY, SECRET_KEY,
# ALLOWED_HOSTS). Without OPENCOMPUTER_API_URL it runs the embedded sandbox server inside.
FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
COPY requirements/base.lock /tmp/base.lock
RUN /opt/venv/bin/pip install --require-hashes -r /tmp/base.lock

FROM python:3.12-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PORTHOLE_DATA_DIR=/data PORTHOLE_HOST=0.0.0.0 PORTHOLE_PORT=8000 \
    STATIC_ROOT=/app/staticfiles
RUN useradd --create-home --uid 10001 porthole && mkdir /data && chown porthole /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=porthole . /app
# Content-hashed, brotli- and gzip-compressed copies that WhiteNoise serves with a year of
# caching; in the image, not in the /data volume, so a new image brings its own.
RUN SECRET_KEY=build-only python manage.py collectstatic --noinput
USER porthole
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"
CMD ["sh", "-c", "python manage.py migrate --noinput && exec python manage.py serve"]
