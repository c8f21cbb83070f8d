# teammesh node. Build: docker build -t teammesh .
# Run:   docker run -v tm:/data -p 4117:4117 teammesh            (first run: init + up)
#        docker run -v tm:/data teammesh join 'tminv1...'        (once, to join a team)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TEAMMESH_HOME=/data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY teammesh ./teammesh
COPY node ./node
COPY protocols ./protocols
COPY storage ./storage
RUN pip install --no-cache-dir . && useradd --create-home --uid 1000 teammesh \
    && mkdir -p /data && chown teammesh /data

USER teammesh
VOLUME ["/data"]
EXPOSE 4117
# `up` stops cleanly on SIGTERM (docker stop); init is idempotent.
ENTRYPOINT ["teammesh"]
CMD ["up", "--listen", "/ip4/0.0.0.0/tcp/4117"]
