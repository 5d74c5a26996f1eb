# The flotilla image the Helm chart runs: a static-ish release binary on a slim base, as nobody.
# Build: docker build -t <your-registry>/flotilla:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin flotilla

FROM debian:bookworm-slim
COPY --from=build /src/target/release/flotilla /usr/local/bin/flotilla
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/flotilla"]
CMD ["run"]
