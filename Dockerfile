FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1000 mediagate
WORKDIR /srv/mediagate
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY app ./app
COPY workers ./workers
RUN pip install --no-cache-dir -e . && mkdir -p /data && chown mediagate /data
USER mediagate
ENV MEDIAGATE_DATA_DIR=/data
EXPOSE 8000
CMD ["mediagate", "serve", "--host", "0.0.0.0", "--port", "8000"]
