# The one jobtree image: every service (`jobtree serve NAME`), `jobtree` and `kubectl-runs`.
# The deployment (deploy/kustomize) runs it as user 10001 with a read-only root filesystem;
# NATS runs from the official nats image. Build: docker build -t jobtree:0.1.0 .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin jobtree
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["jobtree"]
CMD ["--help"]
