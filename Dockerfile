# keygate's container image: one static binary, nothing else.
#   docker build -t keygate:dev .
#   docker run --rm -e KEYGATE_ADMIN_TOKEN=... -p 9191:9191 keygate:dev \
#     serve --listen 0.0.0.0:9191
# The final image is FROM scratch: no shell, no libc, no package manager.
# The binary is static (CGO_ENABLED=0; k8s/image_test.go checks it has no
# interpreter and no shared libraries), runs as 65532:65532 (the runAsUser
# of the manifests under k8s/) and writes only its store, under
# /var/lib/keygate (mount a volume there).

FROM golang:1.26.8 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" \
      -o /out/usr/local/bin/keygate ./cmd/keygate \
 && mkdir -p /out/var/lib/keygate

FROM scratch
COPY --from=build /out/usr/local/bin/keygate /usr/local/bin/keygate
COPY --from=build --chown=65532:65532 /out/var/lib/keygate /var/lib/keygate
# So that `kubectl exec POD -c keygate -- keygate keys list` finds it.
ENV PATH=/usr/local/bin
USER 65532:65532
WORKDIR /var/lib/keygate
EXPOSE 9190 9191
ENTRYPOINT ["/usr/local/bin/keygate"]
CMD ["serve"]
