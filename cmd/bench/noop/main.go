// Command noop is the floor of the keygate load benchmark: an ext_authz
// server that allows every Check and does nothing else, built with grpc-go's
// default settings. Whatever it costs per Check is the price of the gRPC
// transport alone, the least any ext_authz server written with grpc-go can
// cost unless it tunes the transport.
//
// Usage: noop [-listen 127.0.0.1:9291]
//
// It prints "listening on ADDR" once it accepts connections and stops on
// SIGTERM or SIGINT.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/genproto/googleapis/rpc/code"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "noop:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("noop", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:9291", "address to serve ext_authz Checks on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	srv := newServer()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		srv.Stop()
	}()
	fmt.Printf("listening on %s\n", lis.Addr())
	if err := srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return nil
}

// newServer returns a gRPC server with default options serving allowAll.
func newServer() *grpc.Server {
	srv := grpc.NewServer()
	authv3.RegisterAuthorizationServer(srv, allowAll{})
	return srv
}

// allowAll answers every Check with OK and an empty OkHttpResponse: what
// Envoy needs to let a request through, and nothing more.
type allowAll struct {
	authv3.UnimplementedAuthorizationServer
}

func (allowAll) Check(context.Context, *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	return &authv3.CheckResponse{
		Status:       &rpcstatus.Status{Code: int32(code.Code_OK)},
		HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{}},
	}, nil
}
