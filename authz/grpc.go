package authz

import (
	"context"
	"runtime"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/keygate/keygate/authz/wire"
)

// NewGRPCServer returns a gRPC server that serves s as
// envoy.service.auth.v3.Authorization, tuned for Envoy: a few long-lived
// HTTP/2 connections carrying many concurrent Checks. Requests are decoded
// by package wire, which reads only the fields the decision needs. opts are
// appended (and may register more services' options, e.g. health).
func NewGRPCServer(s *Server, opts ...grpc.ServerOption) *grpc.Server {
	base := []grpc.ServerOption{
		grpc.ForceServerCodecV2(wire.Codec{}),
		// Reuse a fixed pool of goroutines for streams instead of one new
		// goroutine (and stack growth) per Check.
		// One worker per CPU is too few: a stream that finds every worker
		// busy gets a new goroutine, whose stack then grows.
		grpc.NumStreamWorkers(uint32(max(128, 16*runtime.GOMAXPROCS(0)))),
		// Large static windows: Checks are small, and BDP probing pings
		// only add work on a loopback or same-pod connection.
		grpc.InitialWindowSize(1 << 20),
		grpc.InitialConnWindowSize(4 << 20),
	}
	gs := grpc.NewServer(append(base, opts...)...)
	gs.RegisterService(&checkServiceDesc, s)
	return gs
}

// checkServiceDesc is authv3.Authorization_ServiceDesc with a handler that
// decodes into a wire.Request instead of a generated CheckRequest.
var checkServiceDesc = grpc.ServiceDesc{
	ServiceName: authv3.Authorization_ServiceDesc.ServiceName,
	HandlerType: (*authv3.AuthorizationServer)(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Check", Handler: checkHandler}},
	Metadata:    authv3.Authorization_ServiceDesc.Metadata,
}

// checkHandler is the served Check. Interceptors are not applied: the hot
// path recovers from panics itself, and nothing else belongs on it.
func checkHandler(srv any, _ context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (resp any, err error) {
	s := srv.(*Server)
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("panic in Check", zap.Any("panic", p), zap.Stack("stack"))
			resp, err = denyInternal.frozen, nil
		}
	}()
	var w wire.Request
	if err := dec(&w); err != nil || w.Malformed {
		s.m.observe(denyMalformed, 0)
		return denyMalformed.frozen, nil
	}
	r := fromWire(&w)
	g, d := s.check(&r)
	if d == nil {
		return encodeAllow(g), nil
	}
	return d.encode(g), nil
}
