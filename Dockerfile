# bite-sync relay for Railway (or any container host): `bite-sync relay` on $PORT.
#
# Build:  docker build -t bite-sync .
# Run:    docker run -p 5000:5000 -e DATABASE_URL=… -e WHATSAPP_VERIFY_TOKEN=… \
#           -e META_APP_SECRET=… bite-sync
# The same image runs any other command: docker run bite-sync sync --help

# ---- build: the release binary ------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not rebuild them: build a stub crate with the
# real manifest and lock file.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src target/release/deps/bite_sync* target/release/deps/libbite_sync* \
           target/release/bite-sync* target/release/.fingerprint/bite-sync-*
COPY . .
RUN cargo build --release --locked --bin bite-sync \
 && strip target/release/bite-sync

# ---- runtime: glibc, CA certificates, no shell, non-root -----------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/bite-sync /usr/local/bin/bite-sync
# Railway sets PORT; 5000 is the old guide's default.
ENV PORT=5000
EXPOSE 5000
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/bite-sync"]
CMD ["relay"]
