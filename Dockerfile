# Image of the aggregator (and the demo fleet) for docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer producer
COPY aggregator aggregator
COPY schemas schemas
COPY demo demo
RUN pip install --no-cache-dir '.[resources]'
EXPOSE 9464
ENTRYPOINT ["modelpulse-aggregator"]
