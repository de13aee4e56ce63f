package k8s

import (
	"net"
	"path"
	"strconv"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/keygate/keygate/cmd/keygate/config"
)

const (
	// imageUID is the user keygate's image runs as (Dockerfile: USER).
	imageUID = 65532
	// drainBound is how long keygate may take from SIGTERM to exit: it
	// drains in-flight Checks for up to 10s, then flushes the ledger.
	drainBound = 15 * time.Second
)

// keygateRun is what one keygate container is set up to do: its flags, its
// config file and keygate's defaults combined as `keygate serve` combines
// them (a flag wins over the file, the file over the default).
type keygateRun struct {
	dep                                 *appsv1.Deployment
	c                                   corev1.Container
	cfg                                 *config.Config
	db, listen, adminListen, httpListen string
}

// serveFlags are the flags of `keygate serve`.
var serveFlags = map[string]bool{"config": true, "db": true, "listen": true, "admin-listen": true, "http-listen": true}

// keygateContainer checks the container named keygate in dep, everything
// that every way of running keygate must get right, and returns what it
// runs. checkAtPodIP says whether the check port is meant to be reachable
// from other pods (a gateway) or stay on loopback (a sidecar).
func keygateContainer(t *testing.T, objs []object, dep *appsv1.Deployment, checkAtPodIP bool) keygateRun {
	t.Helper()
	pod := dep.Spec.Template.Spec
	c := container(t, pod, "keygate")
	r := keygateRun{dep: dep, c: c}

	// The image's ENTRYPOINT is the binary, so args are its arguments.
	if len(c.Command) != 0 {
		t.Errorf("keygate: command %q overrides the image's entrypoint; the image has no shell", c.Command)
	}
	if len(c.Args) == 0 || c.Args[0] != "serve" {
		t.Fatalf("keygate: args %q, want `serve` and its flags", c.Args)
	}
	flags := map[string]string{}
	for i := 1; i < len(c.Args); i++ {
		name, value, ok := strings.Cut(strings.TrimPrefix(c.Args[i], "--"), "=")
		if !strings.HasPrefix(c.Args[i], "--") || !serveFlags[name] {
			t.Fatalf("keygate: %q is not a flag of keygate serve", c.Args[i])
		}
		if !ok {
			if i+1 == len(c.Args) {
				t.Fatalf("keygate: flag --%s has no value", name)
			}
			i++
			value = c.Args[i]
		}
		flags[name] = value
	}

	// The config file, from its ConfigMap, through keygate's own loader.
	cfgPath, ok := flags["config"]
	if !ok {
		t.Fatal("keygate: no --config: the built-in example config would be used")
	}
	data := configMapFile(t, objs, dep.Namespace, pod, c, cfgPath)
	cfg, err := config.Parse([]byte(data))
	if err != nil {
		t.Fatalf("keygate: config %s: %v", cfgPath, err)
	}
	r.cfg = cfg
	pick := func(flag, fromFile string) string {
		if v, ok := flags[flag]; ok {
			return v
		}
		return fromFile
	}
	r.db = pick("db", cfg.DB)
	r.listen = pick("listen", cfg.Listen)
	r.adminListen = pick("admin-listen", cfg.AdminListen)
	r.httpListen = pick("http-listen", cfg.HTTPListen)

	// The store: on a writable volume (the root filesystem is read-only)
	// that is the pod's own (emptyDir) or outlives it (a claim that exists).
	m, vol := mount(t, pod, c, r.db)
	if m.ReadOnly {
		t.Errorf("keygate: --db %s is on read-only mount %s", r.db, m.Name)
	}
	switch {
	case vol.EmptyDir != nil:
	case vol.PersistentVolumeClaim != nil:
		get[*corev1.PersistentVolumeClaim](t, objs, dep.Namespace, vol.PersistentVolumeClaim.ClaimName)
	default:
		t.Errorf("keygate: --db %s is on volume %s, neither an emptyDir nor a PersistentVolumeClaim", r.db, vol.Name)
	}

	// Listeners: admin on loopback always, health and metrics at the pod IP
	// always, checks as the deployment needs.
	_, adminPort := hostPort(t, r.adminListen)
	_, checkPort := hostPort(t, r.listen)
	_, httpPort := hostPort(t, r.httpListen)
	if atPodIP(t, r.adminListen) {
		t.Errorf("keygate: --admin-listen %s is reachable from outside the pod", r.adminListen)
	}
	if !atPodIP(t, r.httpListen) {
		t.Errorf("keygate: --http-listen %s: the kubelet and Prometheus cannot reach it", r.httpListen)
	}
	if atPodIP(t, r.listen) != checkAtPodIP {
		t.Errorf("keygate: --listen %s: reachable from other pods = %v, want %v", r.listen, !checkAtPodIP, checkAtPodIP)
	}
	if adminPort == checkPort || adminPort == httpPort || checkPort == httpPort {
		t.Errorf("keygate: listeners share a port: %s, %s, %s", r.listen, r.adminListen, r.httpListen)
	}
	for _, p := range c.Ports {
		switch {
		case p.ContainerPort == httpPort:
		case p.ContainerPort == checkPort && checkAtPodIP:
		default:
			t.Errorf("keygate: containerPort %s (%d) is not a port keygate serves at the pod IP", p.Name, p.ContainerPort)
		}
	}

	// The admin token from a Secret, never a literal.
	var token *corev1.EnvVar
	for i := range c.Env {
		if c.Env[i].Name == "KEYGATE_ADMIN_TOKEN" {
			token = &c.Env[i]
		}
	}
	switch {
	case token == nil:
		t.Error("keygate: no KEYGATE_ADMIN_TOKEN: the admin API would refuse every call")
	case token.Value != "" || token.ValueFrom == nil || token.ValueFrom.SecretKeyRef == nil:
		t.Error("keygate: KEYGATE_ADMIN_TOKEN does not come from a Secret")
	case token.ValueFrom.SecretKeyRef.Optional != nil && *token.ValueFrom.SecretKeyRef.Optional:
		t.Error("keygate: the admin token Secret is optional")
	}

	// Probes the kubelet can reach: it probes the pod IP.
	probes := map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe}
	for kind, p := range probes {
		switch {
		case p == nil:
			t.Errorf("keygate: no %s probe", kind)
		case p.GRPC != nil:
			if !checkAtPodIP {
				t.Errorf("keygate: gRPC %s probe, but the check port is on loopback", kind)
			}
			// grpc.health.v1 reports NOT_SERVING from the moment keygate drains.
			if p.GRPC.Port != checkPort {
				t.Errorf("keygate: gRPC %s probe on port %d, want keygate's check port %d", kind, p.GRPC.Port, checkPort)
			}
			if s := p.GRPC.Service; s != nil && *s != "" && *s != authv3.Authorization_ServiceDesc.ServiceName {
				t.Errorf("keygate: gRPC %s probe asks about service %q, which keygate does not report", kind, *s)
			}
		case p.HTTPGet != nil:
			if checkAtPodIP {
				t.Errorf("keygate: HTTP %s probe where the gRPC port is reachable: use grpc.health.v1", kind)
			}
			// /readyz turns 503 from the moment keygate drains.
			want := map[string]string{"readiness": "/readyz", "liveness": "/healthz"}[kind]
			if p.HTTPGet.Path != want {
				t.Errorf("keygate: %s probe path %q, want %q", kind, p.HTTPGet.Path, want)
			}
			if p.HTTPGet.Host != "" {
				t.Errorf("keygate: %s probe sets host %q", kind, p.HTTPGet.Host)
			}
			if got := port(t, c, p.HTTPGet.Port); got != httpPort {
				t.Errorf("keygate: %s probe on port %d, want --http-listen's %d", kind, got, httpPort)
			}
		default:
			t.Errorf("keygate: %s probe is neither gRPC nor HTTP (no shell for exec; a TCP connect proves nothing)", kind)
		}
	}

	// /metrics, scrapeable at the pod IP.
	ann := dep.Spec.Template.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/path"] != "/metrics" ||
		ann["prometheus.io/port"] != strconv.Itoa(int(httpPort)) {
		t.Errorf("keygate: prometheus.io annotations %v, want scrape of /metrics on %d", ann, httpPort)
	}

	// Time to drain and flush: preStop, then SIGTERM's drain, inside the grace period.
	stop := preStop(t, "keygate", c)
	if stop <= 0 {
		t.Error("keygate: no preStop sleep: it would stop taking Checks while still in the Service's endpoints")
	}
	grace := 30 * time.Second
	if g := pod.TerminationGracePeriodSeconds; g != nil {
		grace = time.Duration(*g) * time.Second
	}
	if grace < stop+drainBound {
		t.Errorf("keygate: terminationGracePeriodSeconds %v < preStop %v + drain and flush %v", grace, stop, drainBound)
	}

	hardened(t, dep)
	if sc := pod.SecurityContext; sc == nil || sc.FSGroup == nil || *sc.FSGroup != imageUID {
		t.Errorf("keygate: pod fsGroup is not %d: keygate could not write its volume", imageUID)
	}
	return r
}

// hardened checks every container of dep: non-root as the image's user, a
// read-only root filesystem, no capabilities, no privilege escalation,
// requests and limits.
func hardened(t *testing.T, dep *appsv1.Deployment) {
	t.Helper()
	pod := dep.Spec.Template.Spec
	sc := pod.SecurityContext
	if sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Errorf("%s: pod is not runAsNonRoot", dep.Name)
	}
	if sc == nil || sc.RunAsUser == nil || *sc.RunAsUser != imageUID || sc.RunAsGroup == nil || *sc.RunAsGroup != imageUID {
		t.Errorf("%s: pod does not run as %d:%d", dep.Name, imageUID, imageUID)
	}
	if sc == nil || sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: pod has no RuntimeDefault seccomp profile", dep.Name)
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Errorf("%s: pod mounts a service account token it never uses", dep.Name)
	}
	for _, c := range append(pod.InitContainers, pod.Containers...) {
		csc := c.SecurityContext
		if csc == nil || csc.ReadOnlyRootFilesystem == nil || !*csc.ReadOnlyRootFilesystem {
			t.Errorf("%s/%s: root filesystem is not read-only", dep.Name, c.Name)
		}
		if csc == nil || csc.AllowPrivilegeEscalation == nil || *csc.AllowPrivilegeEscalation {
			t.Errorf("%s/%s: privilege escalation is allowed", dep.Name, c.Name)
		}
		if csc == nil || csc.Capabilities == nil || len(csc.Capabilities.Add) != 0 ||
			len(csc.Capabilities.Drop) != 1 || csc.Capabilities.Drop[0] != "ALL" {
			t.Errorf("%s/%s: capabilities are not drop [ALL], add none", dep.Name, c.Name)
		}
		if csc != nil && csc.Privileged != nil && *csc.Privileged {
			t.Errorf("%s/%s: privileged", dep.Name, c.Name)
		}
		for _, res := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			if _, ok := c.Resources.Requests[res]; !ok {
				t.Errorf("%s/%s: no %s request", dep.Name, c.Name, res)
			}
			if _, ok := c.Resources.Limits[res]; !ok {
				t.Errorf("%s/%s: no %s limit", dep.Name, c.Name, res)
			}
		}
	}
}

func container(t *testing.T, pod corev1.PodSpec, name string) corev1.Container {
	t.Helper()
	for _, c := range pod.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %q", name)
	return corev1.Container{}
}

// mount returns the volume mount of c under which file lies, and its volume.
func mount(t *testing.T, pod corev1.PodSpec, c corev1.Container, file string) (corev1.VolumeMount, corev1.Volume) {
	t.Helper()
	var best corev1.VolumeMount
	for _, m := range c.VolumeMounts {
		if strings.HasPrefix(file, strings.TrimSuffix(m.MountPath, "/")+"/") && len(m.MountPath) > len(best.MountPath) {
			best = m
		}
	}
	if best.Name == "" {
		t.Fatalf("%s: %s is on no volume mount: the root filesystem is read-only and not shipped with it", c.Name, file)
	}
	for _, v := range pod.Volumes {
		if v.Name == best.Name {
			return best, v
		}
	}
	t.Fatalf("%s: mount %s names no volume", c.Name, best.Name)
	return best, corev1.Volume{}
}

// configMapFile returns the content of file as c sees it, from the ConfigMap
// mounted there.
func configMapFile(t *testing.T, objs []object, ns string, pod corev1.PodSpec, c corev1.Container, file string) string {
	t.Helper()
	m, vol := mount(t, pod, c, file)
	if vol.ConfigMap == nil || len(vol.ConfigMap.Items) != 0 || m.SubPath != "" {
		t.Fatalf("%s: %s is not a whole ConfigMap's key", c.Name, file)
	}
	cm := get[*corev1.ConfigMap](t, objs, ns, vol.ConfigMap.Name)
	key := strings.TrimPrefix(file, strings.TrimSuffix(m.MountPath, "/")+"/")
	data, ok := cm.Data[key]
	if !ok || path.Base(file) != key {
		t.Fatalf("%s: ConfigMap %s has no key %q for %s", c.Name, cm.Name, key, file)
	}
	return data
}

// port resolves a probe's or Service's port against c's named ports.
func port(t *testing.T, c corev1.Container, p intstr.IntOrString) int32 {
	t.Helper()
	if p.Type == intstr.Int {
		return p.IntVal
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort
		}
	}
	t.Fatalf("%s: no port named %q", c.Name, p.StrVal)
	return 0
}

func hostPort(t *testing.T, addr string) (string, int32) {
	t.Helper()
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		t.Fatalf("address %q: bad port", addr)
	}
	return host, int32(n)
}

// atPodIP reports whether a server listening on addr is reachable at the
// pod's IP (a wildcard address), rather than on loopback only.
func atPodIP(t *testing.T, addr string) bool {
	t.Helper()
	host, _ := hostPort(t, addr)
	if host == "" {
		return true
	}
	if host == "localhost" {
		return false
	}
	ip := net.ParseIP(host)
	if ip == nil {
		t.Fatalf("address %q: listen on an IP address, not a name", addr)
	}
	if !ip.IsLoopback() && !ip.IsUnspecified() {
		t.Fatalf("address %q: a pod's IP is not known in advance; listen on 0.0.0.0 or loopback", addr)
	}
	return ip.IsUnspecified()
}

// preStop returns the preStop sleep of c, failing on a hook that needs a
// shell or a network call.
func preStop(t *testing.T, what string, c corev1.Container) time.Duration {
	t.Helper()
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil {
		return 0
	}
	h := c.Lifecycle.PreStop
	if h.Sleep == nil || h.Exec != nil || h.HTTPGet != nil || h.TCPSocket != nil {
		t.Errorf("%s: preStop is not a sleep (the images have no shell)", what)
		return 0
	}
	return time.Duration(h.Sleep.Seconds) * time.Second
}
