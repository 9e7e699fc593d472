# kiln operator image. No container engine runs on the development machines:
# tests/env/image.sh builds the same image without one (from the release binary,
# reading this file's final stage) and tests/image.rs checks that the two agree,
# so keep the final stage to the instructions image.sh mirrors. See docs/install.md.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/deps/kiln* target/release/kiln*
COPY src ./src
RUN cargo build --release --locked --bin kiln && strip target/release/kiln

# glibc + CA certificates, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kiln /usr/local/bin/kiln
USER 65532:65532
# Metrics, /healthz and /readyz (KILN_METRICS_ADDR, default 0.0.0.0:8080).
EXPOSE 8080
LABEL org.opencontainers.image.title="kiln" \
      org.opencontainers.image.description="Kubernetes operator that builds machine images the way Packer does" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/kiln"]
CMD ["run"]
