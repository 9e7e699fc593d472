# kiln operator image. No container engine runs on the development machines, so
# this file is kept correct by reading, not by CI: see docs/install.md.
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
ENTRYPOINT ["/usr/local/bin/kiln"]
CMD ["run"]
