# keygate — see README.md. Generator versions are pinned here; protoc itself
# comes from the system package (protobuf-compiler).
GO            ?= go
BIN           := bin/keygate
VERSION       ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT        ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS       := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
PROTOC_GEN_GO      := google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
PROTOC_GEN_GO_GRPC := google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
STATICCHECK        := honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: build run test fuzz bench bench-go lint proto clean

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/keygate

# A dev token for a first run on loopback; set KEYGATE_ADMIN_TOKEN yourself
# for anything else.
run: build
	@if [ -z "$$KEYGATE_ADMIN_TOKEN" ]; then echo "make run: KEYGATE_ADMIN_TOKEN not set, using dev-token (export KEYGATE_ADMIN_TOKEN=dev-token in the shell that runs the CLI)"; fi
	KEYGATE_ADMIN_TOKEN=$${KEYGATE_ADMIN_TOKEN:-dev-token} ./$(BIN) serve $(ARGS)

test:
	$(GO) test -race -count=1 -timeout 15m ./...
	cd k8s && $(GO) test -count=1 -timeout 10m ./...

FUZZTIME ?= 15s
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "== $$pkg $$f"; $(GO) test -run='^$$' -fuzz="^$$f$$" -fuzztime=$(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

# make bench: load benchmark against the no-op floor (cmd/bench/README.md), ~4 min.
# PROFILE=1 adds bin/bench/keygate.cpu.pprof; QUICK=1 is a ~40 s smoke run;
# REDIS=1 runs store: redis with 1 and 3 replicas on a redis-server it starts.
bench: build
	$(GO) run ./cmd/bench/load -out bin/bench -keygate $(BIN) $(if $(PROFILE),-profile) $(if $(QUICK),-quick) $(if $(REDIS),-redis)

# make bench-go: the in-process Go benchmarks (decision, handler, store).
bench-go:
	$(GO) test -run='^$$' -bench=. -benchmem ./...

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo 'gofmt: files above need formatting'; exit 1; }
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

proto:
	PATH="$$($(GO) env GOPATH)/bin:$$PATH"; \
	$(GO) install $(PROTOC_GEN_GO) && $(GO) install $(PROTOC_GEN_GO_GRPC) && \
	protoc -I proto --go_out=proto --go_opt=paths=source_relative \
	  --go-grpc_out=proto --go-grpc_opt=paths=source_relative \
	  proto/keygate/admin/v1/admin.proto

clean:
	rm -rf bin
