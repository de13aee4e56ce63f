package main

import (
	"context"
	"net"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// TestCheckOverGRPC sends one Check over real gRPC on loopback.
func TestCheckOverGRPC(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := newServer()
	go srv.Serve(lis) //nolint:errcheck // ends with Stop
	t.Cleanup(srv.Stop)

	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := authv3.NewAuthorizationClient(cc).Check(ctx, &authv3.CheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetStatus().GetCode(); got != int32(code.Code_OK) {
		t.Errorf("status code = %d, want OK", got)
	}
	if resp.GetOkResponse() == nil {
		t.Errorf("no OkResponse in %v", resp)
	}
}

func TestRunRejectsBadFlag(t *testing.T) {
	if err := run([]string{"-nope"}); err == nil {
		t.Error("run accepted an unknown flag")
	}
	if err := run([]string{"-listen", "not an address"}); err == nil {
		t.Error("run accepted a bad address")
	}
}
