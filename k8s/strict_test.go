package k8s

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/keygate/envoy"
)

// TestStrictDecoding: a misspelled field fails, for each family of types
// the overlays use. Without this, the overlay tests could pass on manifests
// that Kubernetes, Istio or Envoy Gateway would reject or silently ignore.
func TestStrictDecoding(t *testing.T) {
	tests := []struct {
		name, js, want string
	}{
		{"Kubernetes", `{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d"},"spec":{"replica":1}}`, `unknown field "replica"`},
		{"Kubernetes metadata", `{"apiVersion":"v1","kind":"Service","metadata":{"name":"s","label":{}}}`, `unknown field "label"`},
		{"Kubernetes container", `{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d"},"spec":{"template":{"spec":{"containers":[{"name":"c","readinesProbe":{}}]}}}}`, "readinesProbe"},
		{"Istio spec", `{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"a"},"spec":{"action":"CUSTOM","provder":{"name":"keygate"}}}`, "provder"},
		{"Istio enum", `{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"a"},"spec":{"action":"CUSTOMER"}}`, "CUSTOMER"},
		{"Gateway API", `{"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute","metadata":{"name":"r"},"spec":{"hostname":["a"]}}`, `unknown field "hostname"`},
		{"Envoy Gateway", `{"apiVersion":"gateway.envoyproxy.io/v1alpha1","kind":"SecurityPolicy","metadata":{"name":"p"},"spec":{"extAuth":{"failOpn":false}}}`, "failOpn"},
		{"unknown kind", `{"apiVersion":"v1","kind":"Secret","metadata":{"name":"s"}}`, "no Go type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := decode([]byte(tt.js))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("decode = %v, want an error mentioning %q", err, tt.want)
			}
		})
	}
	// And the same documents, spelled right, decode: the failures above are
	// the misspellings, not the documents.
	for _, js := range []string{
		`{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d"},"spec":{"replicas":1}}`,
		`{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"a"},"spec":{"action":"CUSTOM","provider":{"name":"keygate"}}}`,
		`{"apiVersion":"gateway.envoyproxy.io/v1alpha1","kind":"SecurityPolicy","metadata":{"name":"p"},"spec":{"extAuth":{"failOpen":false}}}`,
	} {
		if _, err := decode([]byte(js)); err != nil {
			t.Errorf("decode(%s) = %v", js, err)
		}
	}
}

// TestReadmeDeploys: the README shows the command for every overlay.
func TestReadmeDeploys(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	dirs, err := os.ReadDir("overlays")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		cmd := "kubectl apply -k k8s/overlays/" + d.Name()
		if !strings.Contains(string(readme), cmd) {
			t.Errorf("README.md never shows %q", cmd)
		}
	}
}

// TestEveryFileChecked: every YAML file under base/ and overlays/ is either
// a kustomization, a file a kustomization uses (so the overlay tests decode
// it), or one the tests read directly. A file nobody decodes rots.
func TestEveryFileChecked(t *testing.T) {
	readDirectly := map[string]bool{
		"overlays/istio/istio-operator.yaml": true, // meshConfig, TestIstio
		"overlays/istio/istiod-values.yaml":  true, // meshConfig, TestIstio
	}
	for _, root := range []string{"base", "overlays"} {
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || filepath.Ext(p) != ".yaml" || d.Name() == "kustomization.yaml" || readDirectly[p] {
				return err
			}
			k, err := os.ReadFile(filepath.Join(filepath.Dir(p), "kustomization.yaml"))
			if err != nil {
				t.Errorf("%s: no kustomization.yaml beside it", p)
				return nil
			}
			var used bool
			for _, line := range strings.Split(string(k), "\n") {
				line = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "- "))
				used = used || line == d.Name() || line == "path: "+d.Name()
			}
			if !used {
				t.Errorf("%s: no kustomization uses it and no test reads it", p)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// TestEveryEnvoyConfigValid: every Envoy bootstrap under k8s/ is valid,
// whether or not an overlay test reaches it through its ConfigMap.
func TestEveryEnvoyConfigValid(t *testing.T) {
	n := 0
	err := filepath.WalkDir(".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || filepath.Ext(p) != ".yaml" {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if !strings.Contains(string(data), "\nstatic_resources:") {
			return nil
		}
		n++
		if _, err := envoy.ParseBootstrap(data); err != nil {
			t.Errorf("%s: %v", p, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 2 {
		t.Errorf("found %d Envoy configs, want the sidecar's and the gateway's", n)
	}
}
