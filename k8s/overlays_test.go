package k8s

import (
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"testing"

	egv1a1 "github.com/envoyproxy/gateway/api/v1alpha1"
	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	istiosecv1beta1 "istio.io/api/security/v1beta1"
	istionet "istio.io/client-go/pkg/apis/networking/v1"
	istiosec "istio.io/client-go/pkg/apis/security/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1b1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	"github.com/keygate/keygate/envoy"
)

// TestSidecar: the API, Envoy and keygate in one pod, everything but
// Envoy's port on loopback.
func TestSidecar(t *testing.T) {
	objs := render(t, "overlays/sidecar")
	dep := get[*appsv1.Deployment](t, objs, "", "api")
	var names []string
	for _, c := range dep.Spec.Template.Spec.Containers {
		names = append(names, c.Name)
	}
	if !slices.Equal(names, []string{"api", "envoy", "keygate"}) {
		t.Errorf("containers = %v, want api, envoy, keygate", names)
	}
	if r := dep.Spec.Replicas; r == nil || *r != 1 {
		t.Error("replicas is not 1: each pod has its own store, so two replicas would have two sets of keys")
	}
	kg := keygateContainer(t, objs, dep, false)
	if _, vol := mount(t, dep.Spec.Template.Spec, kg.c, kg.db); vol.EmptyDir == nil {
		t.Errorf("keygate's store is on %s, want the pod's emptyDir", vol.Name)
	}

	// Envoy: its config is envoy/envoy.yaml, and it asks this pod's keygate.
	ec := container(t, dep.Spec.Template.Spec, "envoy")
	b, file := envoyBootstrap(t, objs, dep, ec)
	if err := envoy.Verify(b, kg.listen); err != nil {
		t.Errorf("Envoy config: %v", err)
	}
	want, err := os.ReadFile("../envoy/envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if file != string(want) {
		t.Error("overlays/sidecar/envoy.yaml differs from envoy/envoy.yaml: copy it over (cp envoy/envoy.yaml k8s/overlays/sidecar/)")
	}
	envoyPorts(t, ec, b)

	// The Service: Envoy's API port and nothing else.
	svc := get[*corev1.Service](t, objs, "", "api")
	selects(t, "Service api", svc.Spec.Selector, dep)
	if len(svc.Spec.Ports) != 1 {
		t.Fatalf("Service api has %d ports, want Envoy's only", len(svc.Spec.Ports))
	}
	owner, p := podPort(t, dep, svc.Spec.Ports[0].TargetPort.String())
	if owner != "envoy" || p != listenerPort(t, b, "api") {
		t.Errorf("Service api targets %s:%d, want Envoy's api listener %d", owner, p, listenerPort(t, b, "api"))
	}

	// Stop order: Envoy stops forwarding before keygate and the API stop.
	envoyStop := preStop(t, "envoy", ec)
	if got := preStop(t, "keygate", kg.c); got <= envoyStop {
		t.Errorf("keygate's preStop (%v) ends before Envoy's (%v): Envoy would forward Checks to a stopped keygate", got, envoyStop)
	}
	if got := preStop(t, "api", container(t, dep.Spec.Template.Spec, "api")); got <= envoyStop {
		t.Errorf("the API's preStop (%v) ends before Envoy's (%v)", got, envoyStop)
	}
	secretsDocumented(t, dep)
}

// TestGateway: one keygate for an ingress Envoy's pods.
func TestGateway(t *testing.T) {
	objs := render(t, "overlays/gateway")
	kg, svc := keygateServer(t, objs)

	ingress := get[*appsv1.Deployment](t, objs, "keygate", "ingress-envoy")
	hardened(t, ingress)
	ec := container(t, ingress.Spec.Template.Spec, "envoy")
	b, _ := envoyBootstrap(t, objs, ingress, ec)
	if err := envoy.Verify(b, serviceAddr(svc)); err != nil {
		t.Errorf("ingress Envoy config: %v", err)
	}
	envoyPorts(t, ec, b)
	isvc := get[*corev1.Service](t, objs, "keygate", "ingress-envoy")
	selects(t, "Service ingress-envoy", isvc.Spec.Selector, ingress)
	if len(isvc.Spec.Ports) != 1 {
		t.Fatalf("Service ingress-envoy has %d ports, want Envoy's only", len(isvc.Spec.Ports))
	}
	if owner, p := podPort(t, ingress, isvc.Spec.Ports[0].TargetPort.String()); owner != "envoy" || p != listenerPort(t, b, "api") {
		t.Errorf("Service ingress-envoy targets %s:%d, want Envoy's api listener", owner, p)
	}

	// Only the ingress Envoy's pods reach the check port.
	checkPortPeers(t, objs, kg, func(peer networkingv1.NetworkPolicyPeer) bool {
		return peer.NamespaceSelector == nil && peer.IPBlock == nil && matches(t, peer.PodSelector, ingress.Spec.Template.Labels)
	})
}

// TestGatewayKeygateAlone: keygate without the example ingress Envoy, as the
// Istio and Envoy Gateway overlays reuse it, renders on its own.
func TestGatewayKeygateAlone(t *testing.T) {
	objs := render(t, "overlays/gateway/keygate")
	keygateServer(t, objs)
	if deps := all[*appsv1.Deployment](objs); len(deps) != 1 {
		t.Errorf("%d Deployments, want keygate alone", len(deps))
	}
}

// TestIstio: keygate as the mesh's CUSTOM provider at the ingress gateway.
func TestIstio(t *testing.T) {
	objs := render(t, "overlays/istio")
	kg, svc := keygateServer(t, objs)

	ns := get[*corev1.Namespace](t, objs, "", "keygate")
	if ns.Labels["istio-injection"] != "disabled" {
		t.Error("namespace keygate does not disable sidecar injection: a sidecar would rewrite keygate's probes and traffic")
	}

	// The mesh config, for istioctl and for Helm: one provider, the same.
	mesh := meshConfig(t, "overlays/istio/istio-operator.yaml", true)
	if helm := meshConfig(t, "overlays/istio/istiod-values.yaml", false); !proto.Equal(mesh, helm) {
		t.Errorf("istio-operator.yaml and istiod-values.yaml disagree:\n%v\n%v", mesh, helm)
	}

	ap := get[*istiosec.AuthorizationPolicy](t, objs, "", "keygate")
	if ap.Spec.GetAction() != istiosecv1beta1.AuthorizationPolicy_CUSTOM {
		t.Errorf("AuthorizationPolicy action = %v, want CUSTOM", ap.Spec.GetAction())
	}
	name := ap.Spec.GetProvider().GetName()
	var provider *meshv1alpha1.MeshConfig_ExtensionProvider
	for _, p := range mesh.GetExtensionProviders() {
		if p.GetName() == name {
			provider = p
		}
	}
	if provider == nil {
		t.Fatalf("AuthorizationPolicy names provider %q, which the mesh config does not define", name)
	}
	// gRPC: every header reaches keygate, and what keygate sets reaches the
	// upstream, with no header lists (the HTTP provider would need them).
	g := provider.GetEnvoyExtAuthzGrpc()
	if g == nil {
		t.Fatalf("provider %q is not envoyExtAuthzGrpc", name)
	}
	if got, want := fmt.Sprintf("%s:%d", g.GetService(), g.GetPort()), serviceAddr(svc); got != want {
		t.Errorf("provider %q points at %s, want keygate's Service %s", name, got, want)
	}
	if g.GetFailOpen() {
		t.Error("provider fails open: requests would pass while keygate is down")
	}
	if g.GetTimeout().AsDuration() <= 0 {
		t.Error("provider has no timeout")
	}
	if g.GetIncludeRequestBodyInCheck() != nil {
		t.Error("provider sends the request body: keygate decides on headers")
	}

	// For the API's host, on the ingress gateway that serves it.
	gw := get[*istionet.Gateway](t, objs, "", "api")
	vs := get[*istionet.VirtualService](t, objs, "", "api")
	var hosts []string
	for _, rule := range ap.Spec.GetRules() {
		for _, to := range rule.GetTo() {
			hosts = append(hosts, to.GetOperation().GetHosts()...)
		}
	}
	for _, server := range gw.Spec.GetServers() {
		for _, h := range server.GetHosts() {
			if !slices.Contains(hosts, h) || !slices.Contains(hosts, h+":*") {
				t.Errorf("the AuthorizationPolicy does not cover host %s (and %s:*) that the Gateway serves", h, h)
			}
		}
	}
	if !slices.Equal(vs.Spec.GetHosts(), gw.Spec.GetServers()[0].GetHosts()) || !slices.Contains(vs.Spec.GetGateways(), gw.Name) {
		t.Errorf("VirtualService hosts %v via %v do not match Gateway %s %v", vs.Spec.GetHosts(), vs.Spec.GetGateways(), gw.Name, gw.Spec.GetServers()[0].GetHosts())
	}
	sel := ap.Spec.GetSelector().GetMatchLabels()
	if !maps.Equal(sel, gw.Spec.GetSelector()) {
		t.Errorf("AuthorizationPolicy selects %v, the Gateway runs on %v", sel, gw.Spec.GetSelector())
	}

	// Only the ingress gateway's pods reach the check port.
	checkPortPeers(t, objs, kg, func(peer networkingv1.NetworkPolicyPeer) bool {
		return peer.IPBlock == nil && peer.NamespaceSelector != nil &&
			matches(t, peer.NamespaceSelector, map[string]string{"kubernetes.io/metadata.name": ap.Namespace}) &&
			!matches(t, peer.NamespaceSelector, map[string]string{"kubernetes.io/metadata.name": "default"}) &&
			matches(t, peer.PodSelector, sel)
	})
}

// TestEnvoyGateway: keygate as the external authorization of one HTTPRoute.
func TestEnvoyGateway(t *testing.T) {
	objs := render(t, "overlays/envoy-gateway")
	kg, svc := keygateServer(t, objs)

	sp := get[*egv1a1.SecurityPolicy](t, objs, "", "keygate")
	ext := sp.Spec.ExtAuth
	if ext == nil || ext.GRPC == nil || ext.HTTP != nil {
		t.Fatal("SecurityPolicy has no extAuth.grpc: keygate serves gRPC ext_authz")
	}
	if ext.FailOpen != nil && *ext.FailOpen {
		t.Error("SecurityPolicy fails open")
	}
	if ext.Timeout == nil {
		t.Error("SecurityPolicy sets no timeout")
	}
	if len(ext.HeadersToExtAuth) != 0 || ext.BodyToExtAuth != nil {
		t.Error("SecurityPolicy limits what keygate sees: it needs every header, and no body")
	}
	refs := ext.GRPC.BackendRefs
	if len(refs) != 1 {
		t.Fatalf("SecurityPolicy has %d backendRefs, want keygate's Service", len(refs))
	}
	ref := refs[0].BackendObjectReference
	if ref.Namespace == nil || string(*ref.Namespace) != svc.Namespace || string(ref.Name) != svc.Name ||
		ref.Port == nil || int32(*ref.Port) != svc.Spec.Ports[0].Port {
		t.Errorf("SecurityPolicy backendRef %v does not name keygate's Service %s/%s:%d", ref, svc.Namespace, svc.Name, svc.Spec.Ports[0].Port)
	}
	grant := get[*gwv1b1.ReferenceGrant](t, objs, svc.Namespace, "keygate-from-api")
	granted := false
	for _, from := range grant.Spec.From {
		for _, to := range grant.Spec.To {
			granted = granted || (string(from.Group) == egv1a1.GroupName && from.Kind == "SecurityPolicy" &&
				string(from.Namespace) == sp.Namespace && to.Group == "" && to.Kind == "Service" &&
				(to.Name == nil || string(*to.Name) == svc.Name))
		}
	}
	if !granted {
		t.Errorf("no ReferenceGrant lets SecurityPolicies in %s use Service %s/%s", sp.Namespace, svc.Namespace, svc.Name)
	}

	// The policy's route, the route's Gateway, the Gateway's class.
	if len(sp.Spec.TargetRefs) != 1 || sp.Spec.TargetRefs[0].Kind != "HTTPRoute" {
		t.Fatalf("SecurityPolicy targets %v, want one HTTPRoute", sp.Spec.TargetRefs)
	}
	route := get[*gwv1.HTTPRoute](t, objs, sp.Namespace, string(sp.Spec.TargetRefs[0].Name))
	if len(route.Spec.ParentRefs) != 1 {
		t.Fatalf("HTTPRoute has %d parents, want 1", len(route.Spec.ParentRefs))
	}
	gw := get[*gwv1.Gateway](t, objs, route.Namespace, string(route.Spec.ParentRefs[0].Name))
	class := get[*gwv1.GatewayClass](t, objs, "", string(gw.Spec.GatewayClassName))
	if class.Spec.ControllerName != egv1a1.GatewayControllerName {
		t.Errorf("GatewayClass %s is for %s, not Envoy Gateway", class.Name, class.Spec.ControllerName)
	}
	for _, h := range route.Spec.Hostnames {
		if gw.Spec.Listeners[0].Hostname == nil || *gw.Spec.Listeners[0].Hostname != h {
			t.Errorf("HTTPRoute host %s is not the Gateway listener's", h)
		}
	}

	// Only that Gateway's proxy pods reach the check port.
	proxy := map[string]string{
		"gateway.envoyproxy.io/owning-gateway-name":      gw.Name,
		"gateway.envoyproxy.io/owning-gateway-namespace": gw.Namespace,
	}
	checkPortPeers(t, objs, kg, func(peer networkingv1.NetworkPolicyPeer) bool {
		return peer.IPBlock == nil && peer.NamespaceSelector != nil &&
			matches(t, peer.NamespaceSelector, map[string]string{"kubernetes.io/metadata.name": "envoy-gateway-system"}) &&
			!matches(t, peer.NamespaceSelector, map[string]string{"kubernetes.io/metadata.name": gw.Namespace}) &&
			matches(t, peer.PodSelector, proxy) &&
			!matches(t, peer.PodSelector, map[string]string{"gateway.envoyproxy.io/owning-gateway-name": "other"})
	})
}

// keygateServer checks keygate as its own server (the gateway, Istio and
// Envoy Gateway ways): one replica on a claim, its Service, its policy.
func keygateServer(t *testing.T, objs []object) (keygateRun, *corev1.Service) {
	t.Helper()
	dep := get[*appsv1.Deployment](t, objs, "keygate", "keygate")
	kg := keygateContainer(t, objs, dep, true)
	if r := dep.Spec.Replicas; r == nil || *r != 1 {
		t.Error("replicas is not 1: bbolt allows one process per file")
	}
	if dep.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
		t.Error("strategy is not Recreate: a rolling update would start a second keygate on the same file")
	}
	_, vol := mount(t, dep.Spec.Template.Spec, kg.c, kg.db)
	if vol.PersistentVolumeClaim == nil {
		t.Fatalf("keygate's store is on %s, want a PersistentVolumeClaim", vol.Name)
	}
	pvc := get[*corev1.PersistentVolumeClaim](t, objs, "keygate", vol.PersistentVolumeClaim.ClaimName)
	if !slices.Equal(pvc.Spec.AccessModes, []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}) {
		t.Errorf("claim %s access modes %v, want ReadWriteOnce", pvc.Name, pvc.Spec.AccessModes)
	}
	if _, ok := pvc.Spec.Resources.Requests[corev1.ResourceStorage]; !ok {
		t.Errorf("claim %s requests no storage", pvc.Name)
	}
	if sa := dep.Spec.Template.Spec.ServiceAccountName; sa != "" {
		get[*corev1.ServiceAccount](t, objs, "keygate", sa)
	}

	// The Service: keygate's gRPC check port, as HTTP/2, and nothing else.
	svc := get[*corev1.Service](t, objs, "keygate", "keygate")
	selects(t, "Service keygate", svc.Spec.Selector, dep)
	if len(svc.Spec.Ports) != 1 {
		t.Fatalf("Service keygate has %d ports, want the check port only", len(svc.Spec.Ports))
	}
	sp := svc.Spec.Ports[0]
	_, check := hostPort(t, kg.listen)
	if owner, p := podPort(t, dep, sp.TargetPort.String()); owner != "keygate" || p != check {
		t.Errorf("Service keygate targets %s:%d, want keygate's --listen port %d", owner, p, check)
	}
	if sp.AppProtocol == nil || *sp.AppProtocol != "kubernetes.io/h2c" || !strings.HasPrefix(sp.Name, "grpc") {
		t.Errorf("Service port %s does not say gRPC (name grpc*, appProtocol kubernetes.io/h2c)", sp.Name)
	}

	// The NetworkPolicy: the check port for the caller (see checkPortPeers),
	// health and metrics for anyone, the admin port for nobody.
	np := networkPolicy(t, objs, dep)
	_, admin := hostPort(t, kg.adminListen)
	_, httpPort := hostPort(t, kg.httpListen)
	for i, rule := range np.Spec.Ingress {
		if len(rule.Ports) == 0 {
			t.Errorf("NetworkPolicy ingress[%d] admits every port", i)
		}
		for _, p := range rule.Ports {
			if p.Port == nil || p.EndPort != nil {
				t.Errorf("NetworkPolicy ingress[%d] admits a port range", i)
				continue
			}
			switch n := podPortNumber(t, dep, p.Port.String()); n {
			case admin:
				t.Errorf("NetworkPolicy ingress[%d] admits the admin port %d", i, n)
			case check, httpPort:
			default:
				t.Errorf("NetworkPolicy ingress[%d] admits port %d, which keygate does not serve", i, n)
			}
		}
	}
	return kg, svc
}

// checkPortPeers checks that the NetworkPolicy admits to keygate's check
// port only peers that caller accepts, and at least one.
func checkPortPeers(t *testing.T, objs []object, kg keygateRun, caller func(networkingv1.NetworkPolicyPeer) bool) {
	t.Helper()
	np := networkPolicy(t, objs, kg.dep)
	_, check := hostPort(t, kg.listen)
	peers := 0
	for i, rule := range np.Spec.Ingress {
		admitsCheck := false
		for _, p := range rule.Ports {
			admitsCheck = admitsCheck || (p.Port != nil && podPortNumber(t, kg.dep, p.Port.String()) == check)
		}
		if !admitsCheck {
			continue
		}
		if len(rule.From) == 0 {
			t.Errorf("NetworkPolicy ingress[%d] admits everyone to the check port", i)
		}
		for j, peer := range rule.From {
			if !caller(peer) {
				t.Errorf("NetworkPolicy ingress[%d].from[%d] %+v admits pods other than the gateway's", i, j, peer)
			}
			peers++
		}
	}
	if peers == 0 {
		t.Error("NetworkPolicy admits nobody to the check port")
	}
}

// networkPolicy returns the one policy that selects dep's pods, and checks
// that it governs their ingress.
func networkPolicy(t *testing.T, objs []object, dep *appsv1.Deployment) *networkingv1.NetworkPolicy {
	t.Helper()
	var found []*networkingv1.NetworkPolicy
	for _, np := range all[*networkingv1.NetworkPolicy](objs) {
		if np.Namespace == dep.Namespace && matches(t, &np.Spec.PodSelector, dep.Spec.Template.Labels) {
			found = append(found, np)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d NetworkPolicies select %s's pods, want 1", len(found), dep.Name)
	}
	if !slices.Contains(found[0].Spec.PolicyTypes, networkingv1.PolicyTypeIngress) {
		t.Fatalf("NetworkPolicy %s does not govern ingress", found[0].Name)
	}
	return found[0]
}

// envoyBootstrap loads the config an Envoy container runs (-c FILE) from its
// ConfigMap, validated.
func envoyBootstrap(t *testing.T, objs []object, dep *appsv1.Deployment, c corev1.Container) (*bootstrapv3.Bootstrap, string) {
	t.Helper()
	i := slices.Index(c.Args, "-c")
	if i < 0 || i+1 == len(c.Args) {
		t.Fatalf("%s/%s: no -c CONFIG in args %q", dep.Name, c.Name, c.Args)
	}
	file := configMapFile(t, objs, dep.Namespace, dep.Spec.Template.Spec, c, c.Args[i+1])
	b, err := envoy.ParseBootstrap([]byte(file))
	if err != nil {
		t.Fatalf("%s/%s: %v", dep.Name, c.Name, err)
	}
	if addr := b.GetAdmin().GetAddress().GetSocketAddress().GetAddress(); addr != "127.0.0.1" {
		t.Errorf("%s/%s: Envoy's admin listens on %q, want loopback", dep.Name, c.Name, addr)
	}
	envoyImage(t, c)
	return b, file
}

// envoyPorts checks an Envoy container's ports and probes against its
// listeners: every containerPort is a listener, readiness asks the health
// listener.
func envoyPorts(t *testing.T, c corev1.Container, b *bootstrapv3.Bootstrap) {
	t.Helper()
	for _, p := range c.Ports {
		ok := slices.ContainsFunc(b.GetStaticResources().GetListeners(), func(l *listenerv3.Listener) bool {
			sa := l.GetAddress().GetSocketAddress()
			return sa.GetAddress() == "0.0.0.0" && int32(sa.GetPortValue()) == p.ContainerPort
		})
		if !ok {
			t.Errorf("envoy: containerPort %s (%d) is no listener at the pod IP", p.Name, p.ContainerPort)
		}
	}
	r := c.ReadinessProbe
	if r == nil || r.HTTPGet == nil {
		t.Fatal("envoy: no HTTP readiness probe")
	}
	if got, want := port(t, c, r.HTTPGet.Port), listenerPort(t, b, "health"); got != want {
		t.Errorf("envoy: readiness probe on port %d, want the health listener's %d", got, want)
	}
	if c.LivenessProbe == nil {
		t.Error("envoy: no liveness probe")
	}
	if preStop(t, "envoy", c) <= 0 {
		t.Error("envoy: no preStop sleep")
	}
}

// envoyImage checks that Envoy's image is the release whose API the config
// was validated against (go-control-plane's envoy module tracks Envoy's
// releases): a config valid for one Envoy may not be for another. Both
// modules' go.mod must agree, since each validates Envoy configs.
func envoyImage(t *testing.T, c corev1.Container) {
	t.Helper()
	const mod = "github.com/envoyproxy/go-control-plane/envoy"
	var api string
	for _, gomod := range []string{"go.mod", "../go.mod"} {
		v := required(t, gomod, mod)
		if api != "" && v != api {
			t.Errorf("%s requires %s %s, the other go.mod %s", gomod, mod, v, api)
		}
		api = v
	}
	minor := strings.Join(strings.SplitN(api, ".", 3)[:2], ".") // v1.40
	_, tag, _ := strings.Cut(c.Image, ":")
	if !strings.HasPrefix(strings.TrimPrefix(tag, "distroless-"), minor+".") {
		t.Errorf("envoy: image %s, but the config is validated against Envoy's %s API", c.Image, api)
	}
}

// required returns the version of module mod that go.mod requires.
func required(t *testing.T, gomod, mod string) string {
	t.Helper()
	data, err := os.ReadFile(gomod)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(strings.TrimPrefix(strings.TrimSpace(line), "require "))
		if len(f) >= 2 && f[0] == mod && strings.Count(f[1], ".") == 2 {
			return f[1]
		}
	}
	t.Fatalf("%s does not require %s", gomod, mod)
	return ""
}

// meshConfig decodes the meshConfig of an IstioOperator (istioctl) or of
// istiod's Helm values, strictly.
func meshConfig(t *testing.T, file string, operator bool) *meshv1alpha1.MeshConfig {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var raw struct {
		MeshConfig protojsonRaw `json:"meshConfig"`
	}
	if operator {
		var iop struct {
			metav1.TypeMeta `json:",inline"`
			Metadata        metav1.ObjectMeta `json:"metadata"`
			Spec            *struct {
				MeshConfig protojsonRaw `json:"meshConfig"`
			} `json:"spec"`
		}
		if err := strictYAML(data, &iop); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		if iop.APIVersion != "install.istio.io/v1alpha1" || iop.Kind != "IstioOperator" || iop.Spec == nil {
			t.Fatalf("%s: %s %s, want an IstioOperator with a spec", file, iop.APIVersion, iop.Kind)
		}
		raw.MeshConfig = iop.Spec.MeshConfig
	} else if err := strictYAML(data, &raw); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	var mc meshv1alpha1.MeshConfig
	if err := protojson.Unmarshal(raw.MeshConfig, &mc); err != nil {
		t.Fatalf("%s: meshConfig: %v", file, err)
	}
	return &mc
}

// protojsonRaw holds JSON to be decoded later by protojson.
type protojsonRaw []byte

func (r *protojsonRaw) UnmarshalJSON(b []byte) error {
	*r = append((*r)[:0], b...)
	return nil
}

// secretsDocumented checks that every Secret dep needs is one the README
// tells the operator to create: manifests ship no secret values.
func secretsDocumented(t *testing.T, dep *appsv1.Deployment) {
	t.Helper()
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range dep.Spec.Template.Spec.Containers {
		for _, e := range c.Env {
			if e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
				continue
			}
			ref := e.ValueFrom.SecretKeyRef
			cmd := fmt.Sprintf("kubectl create secret generic %s --from-literal=%s=", ref.Name, ref.Key)
			if !strings.Contains(string(readme), cmd) {
				t.Errorf("README.md never tells the operator to run %q", cmd)
			}
		}
	}
}

func selects(t *testing.T, what string, sel map[string]string, dep *appsv1.Deployment) {
	t.Helper()
	if len(sel) == 0 || !labels.SelectorFromSet(sel).Matches(labels.Set(dep.Spec.Template.Labels)) {
		t.Errorf("%s selects %v, which %s's pods (%v) do not match", what, sel, dep.Name, dep.Spec.Template.Labels)
	}
}

func matches(t *testing.T, sel *metav1.LabelSelector, set map[string]string) bool {
	t.Helper()
	if sel == nil {
		return true // a missing selector in a peer means "all"
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		t.Fatal(err)
	}
	return s.Matches(labels.Set(set))
}

// podPort resolves a port (number or name) against dep's containers.
func podPort(t *testing.T, dep *appsv1.Deployment, p string) (string, int32) {
	t.Helper()
	for _, c := range dep.Spec.Template.Spec.Containers {
		for _, cp := range c.Ports {
			if cp.Name == p || fmt.Sprint(cp.ContainerPort) == p {
				return c.Name, cp.ContainerPort
			}
		}
	}
	t.Fatalf("%s: no container declares port %s", dep.Name, p)
	return "", 0
}

func podPortNumber(t *testing.T, dep *appsv1.Deployment, p string) int32 {
	t.Helper()
	var n int32
	if _, err := fmt.Sscan(p, &n); err == nil {
		return n
	}
	_, n = podPort(t, dep, p)
	return n
}

func listenerPort(t *testing.T, b *bootstrapv3.Bootstrap, name string) int32 {
	t.Helper()
	for _, l := range b.GetStaticResources().GetListeners() {
		if l.GetName() == name {
			return int32(l.GetAddress().GetSocketAddress().GetPortValue())
		}
	}
	t.Fatalf("Envoy has no listener %q", name)
	return 0
}

// serviceAddr is how pods reach svc's first port: name.namespace.svc.cluster.local:port.
func serviceAddr(svc *corev1.Service) string {
	return fmt.Sprintf("%s.%s.svc.cluster.local:%d", svc.Name, svc.Namespace, svc.Spec.Ports[0].Port)
}
