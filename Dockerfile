# The operator image:
#   docker build --build-arg SCOPED_SECRETS_GIT_REVISION=$(git rev-parse --short=12 HEAD) \
#     -t <registry>/scoped-secrets:0.1.0 .
# (.git is not sent to the build; the revision shows in `scoped-secrets --version`.)
#
# The builder is Debian 12 (bookworm) like the runtime image: a binary linked against the
# newer glibc of a Debian 13 builder would not start on distroless/cc-debian12.
FROM rust:1.95-bookworm AS build
WORKDIR /src
ARG SCOPED_SECRETS_GIT_REVISION=unknown
ENV SCOPED_SECRETS_GIT_REVISION=${SCOPED_SECRETS_GIT_REVISION}
COPY . .
RUN cargo build --release --locked --bin scoped-secrets

# Distroless: no shell, no package manager; the `cc` variant carries the glibc and libgcc the
# binary links against (TLS is rustls, so no OpenSSL). `nonroot` is UID/GID 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="scoped-secrets" \
      org.opencontainers.image.source="https://github.com/scoped-secrets/scoped-secrets" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /src/target/release/scoped-secrets /usr/local/bin/scoped-secrets
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/scoped-secrets"]
CMD ["run"]
