// Package envoy holds keygate's example Envoy configuration (envoy.yaml) and
// the checks that keep every Envoy configuration keygate ships honest.
//
// There is no Envoy binary in keygate's tests, so a configuration is checked
// in two steps instead. ParseBootstrap decodes it the way Envoy would: strict
// YAML, every field known to Envoy's v3 API, every typed_config resolved and
// every protoc-gen-validate rule enforced, down into nested typed_configs,
// which the generated ValidateAll does not enter. Verify then checks what
// Envoy cannot know: that no request reaches an upstream without passing
// keygate's ext_authz check, and that the check fails closed.
// VerifySettlement also checks that Envoy streams keygate the access log it
// settles spend from (settle: on_response).
package envoy

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/grpc/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"

	// The typed_config types keygate's configurations use besides the ones
	// imported above. Linking them registers them for protojson; a type
	// that is not linked is an error in ParseBootstrap, as in an Envoy
	// built without that extension.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/health_check/v3"
)

// Sentinel errors. ParseBootstrap's errors wrap ErrInvalid; Verify's and
// VerifySettlement's wrap ErrUnprotected or ErrUnsettled.
var (
	// ErrInvalid means Envoy would refuse the configuration.
	ErrInvalid = errors.New("invalid Envoy bootstrap")
	// ErrUnprotected means Envoy would run the configuration, but some
	// request could reach an upstream without keygate's decision, or keygate
	// failing would let requests through.
	ErrUnprotected = errors.New("envoy config does not put keygate in front of the API")
	// ErrUnsettled means requests that keygate reserves spend for could be
	// charged wrongly: their access-log entries would not all reach keygate
	// whole, or their request ids could be chosen by clients.
	ErrUnsettled = errors.New("envoy config does not let keygate settle spend after the response")
)

// costHeader is the response header an upstream reports a request's cost in
// (settle.CostHeader; this package stays free of keygate's server code).
const costHeader = "x-keygate-cost-usd"

// ParseBootstrap decodes a YAML (or JSON) Envoy bootstrap strictly and
// validates it: an unknown or misspelled field, a duplicate key, a
// typed_config of an unknown type or a value that breaks one of Envoy's
// validation rules is an error wrapping ErrInvalid.
func ParseBootstrap(data []byte) (*bootstrapv3.Bootstrap, error) {
	js, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	var b bootstrapv3.Bootstrap
	if err := (protojson.UnmarshalOptions{DiscardUnknown: false}).Unmarshal(js, &b); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if err := b.ValidateAll(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if err := validateTyped(b.ProtoReflect(), "bootstrap"); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return &b, nil
}

// validator is what protoc-gen-validate generates for every Envoy message.
type validator interface{ ValidateAll() error }

// validateTyped finds every Any below m, validates the message inside it and
// recurses into that message: generated validation stops at an Any.
func validateTyped(m protoreflect.Message, path string) error {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		if v, ok := inner.(validator); ok {
			if err := v.ValidateAll(); err != nil {
				return fmt.Errorf("%s (%s): %w", path, a.GetTypeUrl(), err)
			}
		}
		m = inner.ProtoReflect()
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		name := path + "." + string(fd.Name())
		switch {
		case fd.IsList():
			if fd.Message() == nil {
				return true
			}
			l := v.List()
			for i := 0; i < l.Len() && err == nil; i++ {
				err = validateTyped(l.Get(i).Message(), name+"["+strconv.Itoa(i)+"]")
			}
		case fd.IsMap():
			if fd.MapValue().Message() == nil {
				return true
			}
			// Sorted, so that the same input always names the same error.
			var keys []protoreflect.MapKey
			v.Map().Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
				keys = append(keys, k)
				return true
			})
			slices.SortFunc(keys, func(a, b protoreflect.MapKey) int {
				return strings.Compare(a.String(), b.String())
			})
			for _, k := range keys {
				if err = validateTyped(v.Map().Get(k).Message(), name+"["+k.String()+"]"); err != nil {
					break
				}
			}
		case fd.Message() != nil:
			err = validateTyped(v.Message(), name)
		}
		return err == nil
	})
	return err
}

// Verify checks that b cannot let a request reach an upstream without
// keygate's decision, with keygate's ext_authz gRPC server at authzAddr
// ("host:port", the address the keygate cluster's endpoints must name).
//
// Every HTTP connection manager whose routes forward to a cluster must run
// exactly one ext_authz filter before its router, enabled everywhere, over
// gRPC (transport V3, a timeout set, HTTP/2 to a cluster whose every endpoint
// is authzAddr), failing closed, without the request body; and it must
// normalize paths (normalize_path, merge_slashes, escaped slashes rejected)
// and generate its own request ids. Raw TCP proxying, routes from RDS and
// dynamic resources are refused: their routes cannot be seen here. At least
// one route must be protected. Every problem found is reported, joined.
//
// An HTTP gRPC access logger that sends to keygate (settle: on_response) must
// deliver every entry (no filter), over transport V3 and HTTP/2, with the
// x-keygate-cost-usd response header logged; there is at most one per
// connection manager. VerifySettlement also requires one.
func Verify(b *bootstrapv3.Bootstrap, authzAddr string) error {
	return verify(b, authzAddr, false)
}

// VerifySettlement is Verify for a keygate that settles after the response
// (settle: on_response): every connection manager that Verify checks must
// also send keygate its access log, and give keygate request ids that no
// client chose: Envoy sees each client's own address (use_remote_address),
// treats no address as internal, and sends no route through an internal
// redirect, which would be checked again under the same id.
func VerifySettlement(b *bootstrapv3.Bootstrap, authzAddr string) error {
	return verify(b, authzAddr, true)
}

func verify(b *bootstrapv3.Bootstrap, authzAddr string, settle bool) error {
	v := verifier{
		authzAddr: authzAddr, settle: settle,
		clusters: map[string]*clusterv3.Cluster{}, checked: map[string]bool{},
	}
	if b.GetDynamicResources() != nil {
		v.fail("bootstrap", "dynamic_resources cannot be verified: ship static listeners and clusters")
	}
	for _, c := range b.GetStaticResources().GetClusters() {
		v.clusters[c.GetName()] = c
	}
	for _, l := range b.GetStaticResources().GetListeners() {
		chains := l.GetFilterChains()
		if d := l.GetDefaultFilterChain(); d != nil {
			chains = append(slices.Clone(chains), d)
		}
		for i, fc := range chains {
			for _, f := range fc.GetFilters() {
				where := fmt.Sprintf("listener %q filter_chains[%d] %s", l.GetName(), i, f.GetName())
				v.networkFilter(where, f.GetTypedConfig())
			}
		}
	}
	if v.protected == 0 {
		v.fail("bootstrap", "no route forwards to an upstream through keygate")
	}
	return errors.Join(v.errs...)
}

type verifier struct {
	authzAddr string
	settle    bool // VerifySettlement
	clusters  map[string]*clusterv3.Cluster
	checked   map[string]bool // keygate clusters already checked by authzCluster
	protected int             // routes that forward through ext_authz
	errs      []error
}

func (v *verifier) fail(where, format string, args ...any) {
	v.errs = append(v.errs, fmt.Errorf("%w: %s: %s", ErrUnprotected, where, fmt.Sprintf(format, args...)))
}

func (v *verifier) unsettled(where, format string, args ...any) {
	v.errs = append(v.errs, fmt.Errorf("%w: %s: %s", ErrUnsettled, where, fmt.Sprintf(format, args...)))
}

func (v *verifier) networkFilter(where string, tc *anypb.Any) {
	var hcm hcmv3.HttpConnectionManager
	switch {
	case tc.MessageIs(&tcpproxyv3.TcpProxy{}):
		v.fail(where, "tcp_proxy forwards bytes that ext_authz never sees")
	case tc.MessageIs(&hcm):
		if err := tc.UnmarshalTo(&hcm); err != nil {
			v.fail(where, "%v", err)
			return
		}
		v.connectionManager(where, &hcm)
	}
}

func (v *verifier) connectionManager(where string, hcm *hcmv3.HttpConnectionManager) {
	rc := hcm.GetRouteConfig()
	if rc == nil {
		v.fail(where, "routes come from RDS or scoped routes; keygate's protection cannot be verified")
		return
	}
	forwards := v.forwardingRoutes(where, rc)
	if forwards == 0 {
		return // health checks, direct responses, redirects: nothing reaches an upstream
	}

	authz := -1
	router := -1
	for i, f := range hcm.GetHttpFilters() {
		tc := f.GetTypedConfig()
		switch {
		case tc.MessageIs(&extauthzv3.ExtAuthz{}):
			if authz >= 0 {
				v.fail(where, "http_filters[%d]: a second ext_authz filter", i)
				continue
			}
			authz = i
			if f.GetDisabled() {
				v.fail(where, "http_filters[%d]: ext_authz is disabled", i)
			}
			var ea extauthzv3.ExtAuthz
			if err := tc.UnmarshalTo(&ea); err != nil {
				v.fail(where, "http_filters[%d]: %v", i, err)
				continue
			}
			v.extAuthz(fmt.Sprintf("%s http_filters[%d]", where, i), &ea)
		case tc.MessageIs(&routerv3.Router{}):
			router = i
		}
	}
	switch {
	case authz < 0:
		v.fail(where, "no ext_authz filter: %d route(s) reach an upstream unchecked", forwards)
		return
	case router != len(hcm.GetHttpFilters())-1:
		v.fail(where, "the router is not the last http filter")
	case authz > router:
		v.fail(where, "ext_authz comes after the router, which has already forwarded the request")
	}
	if !hcm.GetNormalizePath().GetValue() {
		v.fail(where, "normalize_path is not true: /a/../b would be checked as written and served as /b")
	}
	if !hcm.GetMergeSlashes() {
		v.fail(where, "merge_slashes is not true")
	}
	if hcm.GetPathWithEscapedSlashesAction() != hcmv3.HttpConnectionManager_REJECT_REQUEST {
		v.fail(where, "path_with_escaped_slashes_action is %v, want REJECT_REQUEST", hcm.GetPathWithEscapedSlashesAction())
	}
	if g := hcm.GetGenerateRequestId(); g != nil && !g.GetValue() {
		v.fail(where, "generate_request_id is false")
	}
	if hcm.GetPreserveExternalRequestId() {
		v.fail(where, "preserve_external_request_id lets a client choose the request id")
	}
	v.protected += forwards
	v.accessLogs(where, hcm)
}

// accessLogs checks the HTTP gRPC access loggers of hcm that send to keygate,
// which settles reservations from them, and, for VerifySettlement, that
// there is one and that the request ids it carries are Envoy's own.
func (v *verifier) accessLogs(where string, hcm *hcmv3.HttpConnectionManager) {
	n := 0
	for i, al := range hcm.GetAccessLog() {
		var als alsv3.HttpGrpcAccessLogConfig
		tc := al.GetTypedConfig()
		if !tc.MessageIs(&als) {
			continue
		}
		lwhere := fmt.Sprintf("%s access_log[%d]", where, i)
		if err := tc.UnmarshalTo(&als); err != nil {
			v.unsettled(lwhere, "%v", err)
			continue
		}
		cc := als.GetCommonConfig()
		name := cc.GetGrpcService().GetEnvoyGrpc().GetClusterName()
		if !v.isAuthzCluster(name) {
			continue // a log for someone else
		}
		if n++; n == 2 {
			v.unsettled(lwhere, "a second access logger to keygate: one is enough, each entry would be sent twice")
		}
		if al.GetFilter() != nil {
			v.unsettled(lwhere, "a filter keeps entries from keygate: their reservations are charged at the route's price when settle_timeout passes, failed requests included")
		}
		if cc.GetTransportApiVersion() != corev3.ApiVersion_V3 {
			v.unsettled(lwhere, "transport_api_version is %v, want V3", cc.GetTransportApiVersion())
		}
		if !slices.ContainsFunc(als.GetAdditionalResponseHeadersToLog(), func(h string) bool { return strings.EqualFold(h, costHeader) }) {
			v.unsettled(lwhere, "additional_response_headers_to_log does not list %s: every request would be charged the route's price, never the cost the API reports", costHeader)
		}
		if !v.checked[name] {
			v.checked[name] = true
			v.authzCluster(fmt.Sprintf("cluster %q", name), v.clusters[name], v.unsettled)
		}
	}
	if !v.settle {
		return
	}
	if n == 0 {
		v.unsettled(where, "no envoy.access_loggers.http_grpc sends keygate's cluster the access log: no reservation would settle before settle_timeout, and every request, failed or not, would be charged the route's price")
	}
	if !hcm.GetUseRemoteAddress().GetValue() {
		v.unsettled(where, "use_remote_address is not true: Envoy then takes no request for an edge request and keeps the x-request-id each client sends")
	}
	if iac := hcm.GetInternalAddressConfig(); len(iac.GetCidrRanges()) > 0 || iac.GetUnixSockets() {
		v.unsettled(where, "internal_address_config: requests from internal addresses keep the x-request-id they carry")
	}
	for _, vh := range hcm.GetRouteConfig().GetVirtualHosts() {
		for i, r := range vh.GetRoutes() {
			if r.GetRoute().GetInternalRedirectPolicy() != nil {
				v.unsettled(fmt.Sprintf("%s virtual_host %q routes[%d]", where, vh.GetName(), i),
					"internal_redirect_policy: the redirected request is checked again under the same x-request-id, which still holds a reservation")
			}
		}
	}
}

// forwardingRoutes counts the routes of rc that forward to a cluster, and
// reports those that cannot be verified or that switch ext_authz off.
func (v *verifier) forwardingRoutes(where string, rc *routev3.RouteConfiguration) int {
	v.perFilterConfig(where+" route_config", rc.GetTypedPerFilterConfig())
	n := 0
	for _, vh := range rc.GetVirtualHosts() {
		vwhere := fmt.Sprintf("%s virtual_host %q", where, vh.GetName())
		v.perFilterConfig(vwhere, vh.GetTypedPerFilterConfig())
		for i, r := range vh.GetRoutes() {
			rwhere := fmt.Sprintf("%s routes[%d]", vwhere, i)
			v.perFilterConfig(rwhere, r.GetTypedPerFilterConfig())
			ra := r.GetRoute()
			if ra == nil {
				continue
			}
			n++
			var targets []string
			switch spec := ra.GetClusterSpecifier().(type) {
			case *routev3.RouteAction_Cluster:
				targets = append(targets, spec.Cluster)
			case *routev3.RouteAction_WeightedClusters:
				for _, wc := range spec.WeightedClusters.GetClusters() {
					v.perFilterConfig(rwhere, wc.GetTypedPerFilterConfig())
					targets = append(targets, wc.GetName())
				}
			default:
				v.fail(rwhere, "its cluster is chosen at run time (%T); it could be keygate's", spec)
			}
			for _, t := range targets {
				if v.isAuthzCluster(t) {
					v.fail(rwhere, "routes clients to keygate's own port (cluster %q)", t)
				}
			}
		}
	}
	return n
}

// perFilterConfig reports an ExtAuthzPerRoute that switches the check off.
func (v *verifier) perFilterConfig(where string, m map[string]*anypb.Any) {
	names := make([]string, 0, len(m))
	for name := range m {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		var per extauthzv3.ExtAuthzPerRoute
		if !m[name].MessageIs(&per) {
			continue
		}
		if err := m[name].UnmarshalTo(&per); err != nil {
			v.fail(where, "%v", err)
			continue
		}
		if per.GetDisabled() {
			v.fail(where, "typed_per_filter_config %q disables ext_authz", name)
		}
	}
}

// isAuthzCluster reports whether cluster name points at keygate's address.
func (v *verifier) isAuthzCluster(name string) bool {
	c, ok := v.clusters[name]
	if !ok {
		return false
	}
	addrs, _ := endpoints(c)
	return slices.Contains(addrs, v.authzAddr)
}

func (v *verifier) extAuthz(where string, ea *extauthzv3.ExtAuthz) {
	if ea.GetFailureModeAllow() {
		v.fail(where, "failure_mode_allow: true lets every request through while keygate is down")
	}
	if ea.GetFilterEnabled() != nil {
		v.fail(where, "filter_enabled switches the check off for a fraction of requests")
	}
	if ea.GetWithRequestBody() != nil {
		v.fail(where, "with_request_body: keygate decides on headers and buffering bodies only costs memory")
	}
	if ea.GetTransportApiVersion() != corev3.ApiVersion_V3 {
		v.fail(where, "transport_api_version is %v, want V3", ea.GetTransportApiVersion())
	}
	gs := ea.GetGrpcService()
	if gs == nil {
		v.fail(where, "not a gRPC ext_authz: keygate serves envoy.service.auth.v3.Authorization over gRPC")
		return
	}
	if t := gs.GetTimeout(); t == nil || t.AsDuration() <= 0 {
		v.fail(where, "grpc_service has no timeout")
	}
	name := gs.GetEnvoyGrpc().GetClusterName()
	if name == "" {
		v.fail(where, "grpc_service is not envoy_grpc with a cluster_name")
		return
	}
	c, ok := v.clusters[name]
	if !ok {
		v.fail(where, "cluster %q is not defined", name)
		return
	}
	if !v.checked[name] {
		v.checked[name] = true
		v.authzCluster(fmt.Sprintf("cluster %q", name), c, v.fail)
	}
}

// authzCluster checks a cluster that reaches keygate, reporting with fail.
func (v *verifier) authzCluster(where string, c *clusterv3.Cluster, fail func(where, format string, args ...any)) {
	var opts httpv3.HttpProtocolOptions
	tc, ok := c.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
	switch {
	case !ok || !tc.MessageIs(&opts):
		fail(where, "no HttpProtocolOptions: gRPC needs HTTP/2")
	case tc.UnmarshalTo(&opts) != nil:
		fail(where, "HttpProtocolOptions do not decode")
	case opts.GetExplicitHttpConfig().GetHttp2ProtocolOptions() == nil:
		fail(where, "HttpProtocolOptions do not set explicit_http_config.http2_protocol_options: gRPC needs HTTP/2")
	}
	addrs, err := endpoints(c)
	if err != nil {
		fail(where, "%v", err)
	}
	if len(addrs) == 0 {
		fail(where, "no endpoints")
	}
	for _, a := range addrs {
		if a != v.authzAddr {
			fail(where, "endpoint %s is not keygate's address %s", a, v.authzAddr)
		}
	}
	if c.GetType() == clusterv3.Cluster_STATIC {
		for _, a := range addrs {
			host, _, _ := net.SplitHostPort(a)
			if net.ParseIP(host) == nil {
				fail(where, "a STATIC cluster needs IP addresses, got %s; use STRICT_DNS", a)
			}
		}
	}
}

// endpoints returns the cluster's endpoints as host:port.
func endpoints(c *clusterv3.Cluster) ([]string, error) {
	var addrs []string
	for _, lle := range c.GetLoadAssignment().GetEndpoints() {
		for _, lbe := range lle.GetLbEndpoints() {
			sa := lbe.GetEndpoint().GetAddress().GetSocketAddress()
			if sa == nil {
				return addrs, errors.New("an endpoint without a socket_address")
			}
			addrs = append(addrs, net.JoinHostPort(sa.GetAddress(), strconv.FormatUint(uint64(sa.GetPortValue()), 10)))
		}
	}
	return addrs, nil
}
