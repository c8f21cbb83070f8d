# teammesh node.  Build: docker build -t teammesh .
# First node of a team:  docker run -d --name tm -v tm:/data -p 4117:4117 \
#                          -e TEAMMESH_TEAM_NAME=myteam teammesh
# Joining member:        docker run -d --name tm -v tm:/data -p 4117:4117 \
#                          -e TEAMMESH_INVITE='tminv1...' teammesh
# The entry point (scripts/docker-entrypoint) inits the volume on first run, joins from
# TEAMMESH_INVITE while the node is in no team, then runs `teammesh up`. Other commands
# run as given: docker exec tm teammesh status / doctor / team invite.
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
COPY scripts/docker-entrypoint /usr/local/bin/teammesh-entrypoint
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 --user-group teammesh \
    && mkdir -p /data && chown teammesh /data && chmod 700 /data

USER 1000:1000
VOLUME ["/data"]
# libp2p (TCP); the control API stays on the container's loopback
EXPOSE 4117/tcp
# `teammesh status` asks the control API of the node in $TEAMMESH_HOME (port from api.json)
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["teammesh", "status", "--json"]
# `up` stops cleanly on SIGTERM (docker stop)
ENTRYPOINT ["python", "/usr/local/bin/teammesh-entrypoint"]
CMD ["up", "--listen", "/ip4/0.0.0.0/tcp/4117"]
