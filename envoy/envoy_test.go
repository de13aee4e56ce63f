package envoy

import (
	"errors"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/grpc/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/keygate/keygate/authz/settle"
	"github.com/keygate/keygate/cmd/keygate/config"
)

func shipped(t testing.TB) *bootstrapv3.Bootstrap {
	t.Helper()
	data, err := os.ReadFile("envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	b, err := ParseBootstrap(data)
	if err != nil {
		t.Fatalf("ParseBootstrap(envoy.yaml): %v", err)
	}
	return b
}

// TestShippedConfig is the contract between envoy.yaml and the keygate binary.
func TestShippedConfig(t *testing.T) {
	b := shipped(t)
	if err := VerifySettlement(b, config.DefaultListen); err != nil {
		t.Fatalf("VerifySettlement(envoy.yaml, %s): %v", config.DefaultListen, err)
	}

	// Spelled out beside Verify, so that a change to Verify cannot quietly
	// stop checking the shipped file.
	if a := b.GetAdmin().GetAddress().GetSocketAddress().GetAddress(); !net.ParseIP(a).IsLoopback() {
		t.Errorf("admin listens on %q, want loopback only", a)
	}
	keygate := cluster(t, b, "keygate")
	sa := keygate.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
	if got := net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))); got != config.DefaultListen {
		t.Errorf("keygate cluster endpoint = %s, want keygate's default --listen %s", got, config.DefaultListen)
	}
	hcm := connectionManager(t, b, "api")
	if !hcm.GetNormalizePath().GetValue() || !hcm.GetMergeSlashes() {
		t.Errorf("normalize_path = %v, merge_slashes = %v, want both true", hcm.GetNormalizePath(), hcm.GetMergeSlashes())
	}
	filters := hcm.GetHttpFilters()
	if len(filters) != 2 || filters[0].GetName() != "envoy.filters.http.ext_authz" || filters[1].GetName() != "envoy.filters.http.router" {
		t.Fatalf("http_filters = %v, want ext_authz then router", filters)
	}
	ea := extAuthz(t, hcm)
	if ea.GetFailureModeAllow() {
		t.Error("failure_mode_allow is true")
	}
	if ea.GetTransportApiVersion() != corev3.ApiVersion_V3 {
		t.Errorf("transport_api_version = %v, want V3", ea.GetTransportApiVersion())
	}
	if ea.GetGrpcService().GetTimeout().AsDuration() <= 0 {
		t.Error("no gRPC timeout")
	}
	if got := ea.GetStatusOnError().GetCode(); got != 503 {
		t.Errorf("status_on_error = %v, want 503", got)
	}

	// The access log keygate settles from: to the same cluster as the
	// Checks, every entry, the cost header logged.
	al, als := accessLog(t, hcm)
	if al.GetName() != "envoy.access_loggers.http_grpc" || al.GetFilter() != nil {
		t.Errorf("access log %s with filter %v, want envoy.access_loggers.http_grpc unfiltered", al.GetName(), al.GetFilter())
	}
	cc := als.GetCommonConfig()
	if got := cc.GetGrpcService().GetEnvoyGrpc().GetClusterName(); got != ea.GetGrpcService().GetEnvoyGrpc().GetClusterName() {
		t.Errorf("access log cluster = %q, want ext_authz's", got)
	}
	if cc.GetTransportApiVersion() != corev3.ApiVersion_V3 {
		t.Errorf("access log transport_api_version = %v, want V3", cc.GetTransportApiVersion())
	}
	if cc.GetGrpcService().GetTimeout() != nil {
		t.Error("access log grpc_service has a timeout: the stream is meant to outlive it")
	}
	if got := als.GetAdditionalResponseHeadersToLog(); len(got) != 1 || got[0] != settle.CostHeader {
		t.Errorf("additional_response_headers_to_log = %q, want [%s]", got, settle.CostHeader)
	}
	if g := hcm.GetGenerateRequestId(); (g != nil && !g.GetValue()) || hcm.GetPreserveExternalRequestId() || !hcm.GetUseRemoteAddress().GetValue() {
		t.Error("request ids are not Envoy's own: generate_request_id, preserve_external_request_id or use_remote_address changed")
	}
}

// TestCostHeader: Verify looks for the header keygate settles with.
func TestCostHeader(t *testing.T) {
	if costHeader != settle.CostHeader {
		t.Errorf("costHeader = %q, settle.CostHeader = %q", costHeader, settle.CostHeader)
	}
}

func TestParseBootstrapRejects(t *testing.T) {
	const listener = `
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 0.0.0.0, port_value: 8080}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: s
          route_config: {}
          http_filters:
          - name: authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              grpc_service: {envoy_grpc: {cluster_name: %q}}
              %s
`
	tests := []struct {
		name, yaml, want string
	}{
		{"not YAML", "admin: [", "did not find expected"},
		{"duplicate key", "admin: {}\nadmin: {}\n", "already set"},
		{"unknown field", "admn: {}\n", "unknown field"},
		{"wrong type", "admin: {address: {socket_address: {port_value: eighty}}}\n", "portValue"},
		{"rule broken", "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 70000}}}\n", "PortValue"},
		{"unknown field inside typed_config", fmt2(listener, "keygate", "failure_mode_alow: false"), "failure_mode_alow"},
		{"rule broken inside nested typed_config", fmt2(listener, "", ""), "ClusterName"},
		{"unknown typed_config type", strings.Replace(fmt2(listener, "keygate", ""), "ext_authz.v3.ExtAuthz", "ext_authz.v3.Nope", 1), "Nope"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseBootstrap([]byte(tt.yaml))
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("ParseBootstrap = %v, want ErrInvalid", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ParseBootstrap = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}

func fmt2(format, cluster, extra string) string {
	return strings.Replace(strings.Replace(format, "%q", strconv.Quote(cluster), 1), "%s", extra, 1)
}

// TestVerifyRejects breaks envoy.yaml one way at a time: each must be caught.
func TestVerifyRejects(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(testing.TB, *bootstrapv3.Bootstrap)
		want   string
	}{
		{"fail open", onExtAuthz(func(ea *extauthzv3.ExtAuthz) { ea.FailureModeAllow = true }), "failure_mode_allow"},
		{"no timeout", onExtAuthz(func(ea *extauthzv3.ExtAuthz) { ea.GetGrpcService().Timeout = nil }), "timeout"},
		{"transport AUTO", onExtAuthz(func(ea *extauthzv3.ExtAuthz) { ea.TransportApiVersion = corev3.ApiVersion_AUTO }), "transport_api_version"},
		{"request body", onExtAuthz(func(ea *extauthzv3.ExtAuthz) { ea.WithRequestBody = &extauthzv3.BufferSettings{} }), "with_request_body"},
		{"partly enabled", onExtAuthz(func(ea *extauthzv3.ExtAuthz) { ea.FilterEnabled = &corev3.RuntimeFractionalPercent{} }), "filter_enabled"},
		{"unknown cluster", onExtAuthz(func(ea *extauthzv3.ExtAuthz) { ea.GetGrpcService().GetEnvoyGrpc().ClusterName = "nope" }), `"nope" is not defined`},
		{"HTTP service", onExtAuthz(func(ea *extauthzv3.ExtAuthz) {
			ea.Services = &extauthzv3.ExtAuthz_HttpService{HttpService: &extauthzv3.HttpService{}}
		}), "not a gRPC ext_authz"},
		{"router first", onHCM(func(h *hcmv3.HttpConnectionManager) {
			f := h.HttpFilters
			f[0], f[1] = f[1], f[0]
		}), "router is not the last"},
		{"no ext_authz", onHCM(func(h *hcmv3.HttpConnectionManager) { h.HttpFilters = h.HttpFilters[1:] }), "no ext_authz filter"},
		{"two ext_authz", onHCM(func(h *hcmv3.HttpConnectionManager) {
			h.HttpFilters = append([]*hcmv3.HttpFilter{h.HttpFilters[0]}, h.HttpFilters...)
		}), "second ext_authz"},
		{"ext_authz disabled", onHCM(func(h *hcmv3.HttpConnectionManager) { h.HttpFilters[0].Disabled = true }), "disabled"},
		{"no normalize_path", onHCM(func(h *hcmv3.HttpConnectionManager) { h.NormalizePath = nil }), "normalize_path"},
		{"no merge_slashes", onHCM(func(h *hcmv3.HttpConnectionManager) { h.MergeSlashes = false }), "merge_slashes"},
		{"escaped slashes kept", onHCM(func(h *hcmv3.HttpConnectionManager) {
			h.PathWithEscapedSlashesAction = hcmv3.HttpConnectionManager_KEEP_UNCHANGED
		}), "path_with_escaped_slashes_action"},
		{"no request ids", onHCM(func(h *hcmv3.HttpConnectionManager) { h.GenerateRequestId = wrapperspb.Bool(false) }), "generate_request_id"},
		{"client request ids", onHCM(func(h *hcmv3.HttpConnectionManager) { h.PreserveExternalRequestId = true }), "preserve_external_request_id"},
		{"RDS", onHCM(func(h *hcmv3.HttpConnectionManager) {
			h.RouteSpecifier = &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: "api"}}
		}), "RDS"},
		{"route opts out", onHCM(func(h *hcmv3.HttpConnectionManager) {
			r := h.GetRouteConfig().GetVirtualHosts()[0].GetRoutes()[0]
			r.TypedPerFilterConfig = map[string]*anypb.Any{"envoy.filters.http.ext_authz": mustAny(&extauthzv3.ExtAuthzPerRoute{
				Override: &extauthzv3.ExtAuthzPerRoute_Disabled{Disabled: true},
			})}
		}), "disables ext_authz"},
		{"virtual host opts out", onHCM(func(h *hcmv3.HttpConnectionManager) {
			vh := h.GetRouteConfig().GetVirtualHosts()[0]
			vh.TypedPerFilterConfig = map[string]*anypb.Any{"authz": mustAny(&extauthzv3.ExtAuthzPerRoute{
				Override: &extauthzv3.ExtAuthzPerRoute_Disabled{Disabled: true},
			})}
		}), "disables ext_authz"},
		{"cluster from a header", onHCM(func(h *hcmv3.HttpConnectionManager) {
			h.GetRouteConfig().GetVirtualHosts()[0].GetRoutes()[0].GetRoute().ClusterSpecifier = &routev3.RouteAction_ClusterHeader{ClusterHeader: "x-cluster"}
		}), "chosen at run time"},
		{"keygate exposed", onHCM(func(h *hcmv3.HttpConnectionManager) {
			h.GetRouteConfig().GetVirtualHosts()[0].GetRoutes()[0].GetRoute().ClusterSpecifier = &routev3.RouteAction_Cluster{Cluster: "keygate"}
		}), "keygate's own port"},
		{"wrong port", func(t testing.TB, b *bootstrapv3.Bootstrap) {
			socket(cluster(t, b, "keygate")).PortSpecifier = &corev3.SocketAddress_PortValue{PortValue: 9192}
		}, "is not keygate's address"},
		{"hostname in a STATIC cluster", func(t testing.TB, b *bootstrapv3.Bootstrap) {
			socket(cluster(t, b, "keygate")).Address = "keygate.local"
		}, "STRICT_DNS"},
		{"HTTP/1 to keygate", func(t testing.TB, b *bootstrapv3.Bootstrap) {
			c := cluster(t, b, "keygate")
			c.TypedExtensionProtocolOptions["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] = mustAny(&httpv3.HttpProtocolOptions{
				UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
					ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &corev3.Http1ProtocolOptions{}},
				}},
			})
		}, "HTTP/2"},
		{"no protocol options", func(t testing.TB, b *bootstrapv3.Bootstrap) {
			cluster(t, b, "keygate").TypedExtensionProtocolOptions = nil
		}, "HTTP/2"},
		{"raw TCP listener", func(t testing.TB, b *bootstrapv3.Bootstrap) {
			b.StaticResources.Listeners = append(b.StaticResources.Listeners, &listenerv3.Listener{
				Name: "tcp",
				FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
					Name:       "tcp",
					ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(&tcpproxyv3.TcpProxy{StatPrefix: "tcp"})},
				}}}},
			})
		}, "tcp_proxy"},
		{"dynamic resources", func(t testing.TB, b *bootstrapv3.Bootstrap) {
			b.DynamicResources = &bootstrapv3.Bootstrap_DynamicResources{}
		}, "dynamic_resources"},
		{"nothing protected", func(t testing.TB, b *bootstrapv3.Bootstrap) {
			b.StaticResources.Listeners = nil
		}, "no route forwards"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := shipped(t)
			tt.mutate(t, b)
			err := Verify(b, config.DefaultListen)
			if !errors.Is(err, ErrUnprotected) {
				t.Fatalf("Verify = %v, want ErrUnprotected", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Verify = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}

// TestVerifySettlementRejects breaks the shipped access log and request ids
// one way at a time. A broken access logger to keygate is an error for
// Verify too (fromVerify); a missing one, or request ids a client can
// choose, only for VerifySettlement.
func TestVerifySettlementRejects(t *testing.T) {
	tests := []struct {
		name       string
		mutate     func(testing.TB, *bootstrapv3.Bootstrap)
		want       string
		fromVerify bool
	}{
		{"no access log", onHCM(func(h *hcmv3.HttpConnectionManager) { h.AccessLog = h.AccessLog[:1] }), "no envoy.access_loggers.http_grpc", false},
		{"access log elsewhere", onAccessLog(func(_ *accesslogv3.AccessLog, c *alsv3.HttpGrpcAccessLogConfig) {
			c.GetCommonConfig().GetGrpcService().GetEnvoyGrpc().ClusterName = "api"
		}), "no envoy.access_loggers.http_grpc", false},
		{"cost header not logged", onAccessLog(func(_ *accesslogv3.AccessLog, c *alsv3.HttpGrpcAccessLogConfig) {
			c.AdditionalResponseHeadersToLog = []string{"x-other"}
		}), "does not list x-keygate-cost-usd", true},
		{"filtered", onAccessLog(func(al *accesslogv3.AccessLog, _ *alsv3.HttpGrpcAccessLogConfig) {
			al.Filter = &accesslogv3.AccessLogFilter{FilterSpecifier: &accesslogv3.AccessLogFilter_NotHealthCheckFilter{
				NotHealthCheckFilter: &accesslogv3.NotHealthCheckFilter{},
			}}
		}), "a filter keeps entries from keygate", true},
		{"transport AUTO", onAccessLog(func(_ *accesslogv3.AccessLog, c *alsv3.HttpGrpcAccessLogConfig) {
			c.GetCommonConfig().TransportApiVersion = corev3.ApiVersion_AUTO
		}), "transport_api_version is AUTO", true},
		{"two access logs to keygate", onHCM(func(h *hcmv3.HttpConnectionManager) {
			h.AccessLog = append(h.AccessLog, h.AccessLog[1])
		}), "a second access logger", true},
		{"access log cluster on HTTP/1", func(t testing.TB, b *bootstrapv3.Bootstrap) {
			als := proto.Clone(cluster(t, b, "keygate")).(*clusterv3.Cluster)
			als.Name = "keygate-als"
			als.TypedExtensionProtocolOptions = nil
			b.StaticResources.Clusters = append(b.StaticResources.Clusters, als)
			onAccessLog(func(_ *accesslogv3.AccessLog, c *alsv3.HttpGrpcAccessLogConfig) {
				c.GetCommonConfig().GetGrpcService().GetEnvoyGrpc().ClusterName = "keygate-als"
			})(t, b)
		}, `cluster "keygate-als": no HttpProtocolOptions`, true},
		{"client addresses from x-forwarded-for", onHCM(func(h *hcmv3.HttpConnectionManager) { h.UseRemoteAddress = nil }), "use_remote_address", false},
		{"internal addresses", onHCM(func(h *hcmv3.HttpConnectionManager) {
			h.InternalAddressConfig = &hcmv3.HttpConnectionManager_InternalAddressConfig{
				CidrRanges: []*corev3.CidrRange{{AddressPrefix: "10.0.0.0", PrefixLen: wrapperspb.UInt32(8)}},
			}
		}), "internal_address_config", false},
		{"internal redirects", onHCM(func(h *hcmv3.HttpConnectionManager) {
			h.GetRouteConfig().GetVirtualHosts()[0].GetRoutes()[0].GetRoute().InternalRedirectPolicy = &routev3.InternalRedirectPolicy{}
		}), "internal_redirect_policy", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := shipped(t)
			tt.mutate(t, b)
			err := VerifySettlement(b, config.DefaultListen)
			if !errors.Is(err, ErrUnsettled) {
				t.Fatalf("VerifySettlement = %v, want ErrUnsettled", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("VerifySettlement = %v, want it to mention %q", err, tt.want)
			}
			err = Verify(b, config.DefaultListen)
			if got := errors.Is(err, ErrUnsettled) && strings.Contains(err.Error(), tt.want); got != tt.fromVerify {
				t.Errorf("Verify = %v; reports it: %v, want %v", err, got, tt.fromVerify)
			}
			if errors.Is(err, ErrUnprotected) {
				t.Errorf("Verify = %v: a settlement problem reported as unprotected", err)
			}
		})
	}
}

// TestVerifyWithoutSettlement: a config with no access log to keygate, as
// for settle: on_check, passes Verify.
func TestVerifyWithoutSettlement(t *testing.T) {
	b := shipped(t)
	onHCM(func(h *hcmv3.HttpConnectionManager) { h.AccessLog = h.AccessLog[:1] })(t, b)
	if err := Verify(b, config.DefaultListen); err != nil {
		t.Fatal(err)
	}
}

// TestVerifyAcceptsDNS: a gateway reaches keygate by its Service name.
func TestVerifyAcceptsDNS(t *testing.T) {
	b := shipped(t)
	c := cluster(t, b, "keygate")
	c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STRICT_DNS}
	socket(c).Address = "keygate.keygate.svc.cluster.local"
	if err := VerifySettlement(b, "keygate.keygate.svc.cluster.local:9191"); err != nil {
		t.Fatal(err)
	}
	if err := Verify(b, config.DefaultListen); err == nil {
		t.Fatal("Verify accepted a cluster that is not at the expected address")
	}
}

// FuzzParseBootstrap: no input panics, and whatever is accepted encodes back
// to a document that is accepted again.
func FuzzParseBootstrap(f *testing.F) {
	data, err := os.ReadFile("envoy.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(data)
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := ParseBootstrap(data)
		if err != nil {
			return
		}
		_ = Verify(b, config.DefaultListen)
		_ = VerifySettlement(b, config.DefaultListen)
		js, err := protojson.Marshal(b)
		if err != nil {
			t.Fatalf("accepted bootstrap does not encode: %v", err)
		}
		again, err := ParseBootstrap(js)
		if err != nil {
			t.Fatalf("accepted bootstrap re-encoded as %s is refused: %v", js, err)
		}
		if !proto.Equal(b, again) {
			t.Fatalf("round trip changed the bootstrap:\n%v\n%v", b, again)
		}
	})
}

func cluster(t testing.TB, b *bootstrapv3.Bootstrap, name string) *clusterv3.Cluster {
	t.Helper()
	for _, c := range b.GetStaticResources().GetClusters() {
		if c.GetName() == name {
			return c
		}
	}
	t.Fatalf("no cluster %q", name)
	return nil
}

func socket(c *clusterv3.Cluster) *corev3.SocketAddress {
	return c.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
}

// connectionManager decodes the HTTP connection manager of the named listener.
func connectionManager(t testing.TB, b *bootstrapv3.Bootstrap, listener string) *hcmv3.HttpConnectionManager {
	t.Helper()
	for _, l := range b.GetStaticResources().GetListeners() {
		if l.GetName() != listener {
			continue
		}
		var hcm hcmv3.HttpConnectionManager
		if err := l.GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(&hcm); err != nil {
			t.Fatal(err)
		}
		return &hcm
	}
	t.Fatalf("no listener %q", listener)
	return nil
}

func extAuthz(t testing.TB, hcm *hcmv3.HttpConnectionManager) *extauthzv3.ExtAuthz {
	t.Helper()
	var ea extauthzv3.ExtAuthz
	if err := hcm.GetHttpFilters()[0].GetTypedConfig().UnmarshalTo(&ea); err != nil {
		t.Fatal(err)
	}
	return &ea
}

// onHCM edits the api listener's connection manager in place.
func onHCM(edit func(*hcmv3.HttpConnectionManager)) func(testing.TB, *bootstrapv3.Bootstrap) {
	return func(t testing.TB, b *bootstrapv3.Bootstrap) {
		hcm := connectionManager(t, b, "api")
		edit(hcm)
		for _, l := range b.GetStaticResources().GetListeners() {
			if l.GetName() == "api" {
				l.GetFilterChains()[0].GetFilters()[0].ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(hcm)}
			}
		}
	}
}

// accessLog decodes the http_grpc access logger of hcm.
func accessLog(t testing.TB, hcm *hcmv3.HttpConnectionManager) (*accesslogv3.AccessLog, *alsv3.HttpGrpcAccessLogConfig) {
	t.Helper()
	for _, al := range hcm.GetAccessLog() {
		var als alsv3.HttpGrpcAccessLogConfig
		if al.GetTypedConfig().MessageIs(&als) {
			if err := al.GetTypedConfig().UnmarshalTo(&als); err != nil {
				t.Fatal(err)
			}
			return al, &als
		}
	}
	t.Fatal("no http_grpc access log")
	return nil, nil
}

// onAccessLog edits the api listener's http_grpc access logger in place.
func onAccessLog(edit func(*accesslogv3.AccessLog, *alsv3.HttpGrpcAccessLogConfig)) func(testing.TB, *bootstrapv3.Bootstrap) {
	return func(t testing.TB, b *bootstrapv3.Bootstrap) {
		onHCM(func(hcm *hcmv3.HttpConnectionManager) {
			al, als := accessLog(t, hcm)
			edit(al, als)
			al.ConfigType = &accesslogv3.AccessLog_TypedConfig{TypedConfig: mustAny(als)}
		})(t, b)
	}
}

// onExtAuthz edits the api listener's ext_authz filter in place.
func onExtAuthz(edit func(*extauthzv3.ExtAuthz)) func(testing.TB, *bootstrapv3.Bootstrap) {
	return func(t testing.TB, b *bootstrapv3.Bootstrap) {
		onHCM(func(hcm *hcmv3.HttpConnectionManager) {
			ea := extAuthz(t, hcm)
			edit(ea)
			hcm.GetHttpFilters()[0].ConfigType = &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(ea)}
		})(t, b)
	}
}

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err) // only for messages built in this file
	}
	return a
}
