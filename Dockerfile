# The votebox processor image (docker-compose.yml builds it).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY processor ./processor
COPY broker ./broker
COPY devices ./devices
COPY harness ./harness
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT ["votebox"]
CMD ["processor"]
