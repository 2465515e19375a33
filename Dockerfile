# The agent image: one static binary, the CA roots and a non-root user, nothing else.
# Build: docker build -t shapeblock-agent .
#
# The same static build runs in CI without a container engine (tools/static-binary.sh), which
# checks that the binary starts and links no shared library.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The workspace: crates/proto's build script compiles its proto/ with a protoc written in
# Rust, crates/agent's patches the embedded chart; charts/ holds a file the test support embeds.
# Tests and tools are not needed.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
COPY crds ./crds
COPY charts ./charts
# Cargo.toml declares the benchmark targets; cargo wants their files present.
COPY benches ./benches
# crt-static on the gnu target: glibc linked in statically (glibc >= 2.34 has DNS built in,
# so name lookups need no NSS module at run time). --target keeps the flag off build scripts.
RUN RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --locked --profile image -p shapeblock --no-default-features --bin shapeblock-agent \
      --target x86_64-unknown-linux-gnu \
 && cp target/x86_64-unknown-linux-gnu/image/shapeblock-agent /shapeblock-agent \
 && ! ldd /shapeblock-agent

# distroless/static: CA roots, /etc/passwd with nonroot (65532), tzdata; no shell, no libc.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /shapeblock-agent /usr/local/bin/shapeblock-agent
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/shapeblock-agent"]
CMD ["run"]
