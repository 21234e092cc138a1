# One chat node in a container. Build and run it with the commands in the README's
# "Deployment" section; the server's key, token secret, history and accounts live in
# the /data volume.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# The dependencies first, in a layer of their own: the pinned versions, each checked
# against its hash (pip refuses anything the lock file does not name).
COPY requirements.lock ./
RUN pip install --no-cache-dir --root-user-action=ignore --require-hashes -r requirements.lock

COPY server.py ./
COPY securechat/ securechat/
COPY chat.toml /etc/securechat/chat.toml

# A user of its own, owning only the data directory: 0700, as the server requires.
RUN useradd --system --user-group --uid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin chat \
    && install -d -o chat -g chat -m 700 /data
USER chat
VOLUME /data
EXPOSE 7878

# Every interface of the container (its port is published or not by `docker run -p`),
# and the paths of the volume; every other option comes from the file, and options
# after the image's name in `docker run` are added to these.
ENTRYPOINT ["python", "/app/server.py", "--config", "/etc/securechat/chat.toml", "--host", "0.0.0.0", "--users", "/data/users.json", "--data-dir", "/data"]
