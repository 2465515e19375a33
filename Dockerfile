# The agent image: a static-ish Rust binary on distroless (glibc, CA certificates, nonroot user).
# Build: docker build -t shapeblock-agent .
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crds ./crds
RUN cargo build --locked --release --bin shapeblock-agent \
 && cp target/release/shapeblock-agent /shapeblock-agent

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /shapeblock-agent /usr/local/bin/shapeblock-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/shapeblock-agent"]
