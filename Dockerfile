# The votebox processor image (docker-compose.yml builds it).

# The dashboard's one npm dependency, as dashboard/package-lock.json pins it; the wheel carries
# it (pyproject.toml, force-include), so `votebox dashboard` serves the page from the image.
FROM node:20-slim AS dashboard
WORKDIR /dashboard
COPY dashboard/package.json dashboard/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error

FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md hatch_build.py ./
COPY processor ./processor
COPY broker ./broker
COPY devices ./devices
COPY dashboard/index.html dashboard/app.js dashboard/style.css dashboard/kiosk.html dashboard/kiosk.js ./dashboard/
COPY --from=dashboard /dashboard/node_modules ./dashboard/node_modules
# Installed, then the sources removed: the image runs the package as pip laid it out.
RUN pip install --no-cache-dir . && rm -rf /app/*
USER nobody
ENTRYPOINT ["votebox"]
CMD ["processor"]
