package k8s

import (
	"bytes"
	"encoding/json"
	"fmt"
	"testing"

	egv1a1 "github.com/envoyproxy/gateway/api/v1alpha1"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	istionet "istio.io/client-go/pkg/apis/networking/v1"
	istiosec "istio.io/client-go/pkg/apis/security/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1b1 "sigs.k8s.io/gateway-api/apis/v1beta1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// object is a decoded manifest: its Go type, and where it came from.
type object struct {
	gvk       schema.GroupVersionKind
	namespace string
	name      string
	obj       any // a pointer to the Go type of gvk
}

// kinds is every kind the overlays may render, with its Go type. A kind not
// listed here is an error: nothing is shipped undecoded.
var kinds = map[schema.GroupVersionKind]func() any{
	{Version: "v1", Kind: "ConfigMap"}:                                               func() any { return new(corev1.ConfigMap) },
	{Version: "v1", Kind: "Namespace"}:                                               func() any { return new(corev1.Namespace) },
	{Version: "v1", Kind: "PersistentVolumeClaim"}:                                   func() any { return new(corev1.PersistentVolumeClaim) },
	{Version: "v1", Kind: "Service"}:                                                 func() any { return new(corev1.Service) },
	{Version: "v1", Kind: "ServiceAccount"}:                                          func() any { return new(corev1.ServiceAccount) },
	{Group: "apps", Version: "v1", Kind: "Deployment"}:                               func() any { return new(appsv1.Deployment) },
	{Group: "networking.k8s.io", Version: "v1", Kind: "NetworkPolicy"}:               func() any { return new(networkingv1.NetworkPolicy) },
	{Group: "security.istio.io", Version: "v1", Kind: "AuthorizationPolicy"}:         func() any { return new(istiosec.AuthorizationPolicy) },
	{Group: "networking.istio.io", Version: "v1", Kind: "Gateway"}:                   func() any { return new(istionet.Gateway) },
	{Group: "networking.istio.io", Version: "v1", Kind: "VirtualService"}:            func() any { return new(istionet.VirtualService) },
	{Group: "gateway.networking.k8s.io", Version: "v1", Kind: "GatewayClass"}:        func() any { return new(gwv1.GatewayClass) },
	{Group: "gateway.networking.k8s.io", Version: "v1", Kind: "Gateway"}:             func() any { return new(gwv1.Gateway) },
	{Group: "gateway.networking.k8s.io", Version: "v1", Kind: "HTTPRoute"}:           func() any { return new(gwv1.HTTPRoute) },
	{Group: "gateway.networking.k8s.io", Version: "v1beta1", Kind: "ReferenceGrant"}: func() any { return new(gwv1b1.ReferenceGrant) },
	{Group: "gateway.envoyproxy.io", Version: "v1alpha1", Kind: "SecurityPolicy"}:    func() any { return new(egv1a1.SecurityPolicy) },
}

// render runs kustomize on dir, as `kustomize build dir` would, and decodes
// every object strictly.
func render(t *testing.T, dir string) []object {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	rm, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	var objs []object
	for _, r := range rm.Resources() {
		js, err := r.MarshalJSON()
		if err != nil {
			t.Fatalf("%s: %s: %v", dir, r.CurId(), err)
		}
		o, err := decode(js)
		if err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		objs = append(objs, o)
	}
	return objs
}

// decode decodes one object's JSON strictly into the Go type of its kind.
func decode(js []byte) (object, error) {
	var tm metav1.TypeMeta
	if err := json.Unmarshal(js, &tm); err != nil {
		return object{}, err
	}
	gvk := tm.GroupVersionKind()
	newObj, ok := kinds[gvk]
	if !ok {
		return object{}, fmt.Errorf("%s: no Go type to check it against", gvk)
	}
	obj := newObj()
	var err error
	switch o := obj.(type) {
	case *istiosec.AuthorizationPolicy:
		err = decodeIstio(js, &o.TypeMeta, &o.ObjectMeta, &o.Spec)
	case *istionet.Gateway:
		err = decodeIstio(js, &o.TypeMeta, &o.ObjectMeta, &o.Spec)
	case *istionet.VirtualService:
		err = decodeIstio(js, &o.TypeMeta, &o.ObjectMeta, &o.Spec)
	default:
		err = strictJSON(js, obj)
	}
	if err != nil {
		return object{}, fmt.Errorf("%s: %w", gvk, err)
	}
	meta := obj.(metav1.Object)
	return object{gvk: gvk, namespace: meta.GetNamespace(), name: meta.GetName(), obj: obj}, nil
}

// strictJSON decodes js into v, refusing unknown fields.
func strictJSON(js []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return fmt.Errorf("trailing data after the object")
	}
	return nil
}

// decodeIstio decodes an Istio object. Istio's spec types decode JSON with
// unknown fields allowed, so the spec goes through protojson instead, which
// refuses them.
func decodeIstio(js []byte, tm *metav1.TypeMeta, om *metav1.ObjectMeta, spec proto.Message) error {
	var raw struct {
		metav1.TypeMeta `json:",inline"`
		Metadata        metav1.ObjectMeta `json:"metadata"`
		Spec            json.RawMessage   `json:"spec"`
	}
	if err := strictJSON(js, &raw); err != nil {
		return err
	}
	*tm, *om = raw.TypeMeta, raw.Metadata
	return protojson.Unmarshal(raw.Spec, spec)
}

// strictYAML decodes a YAML file strictly into v (for files that are not
// kustomize resources).
func strictYAML(data []byte, v any) error {
	js, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return err
	}
	return strictJSON(js, v)
}

// get returns the one object of type T named name (in namespace ns, unless
// ns is ""), failing the test if there is not exactly one.
func get[T any](t *testing.T, objs []object, ns, name string) T {
	t.Helper()
	var found []T
	for _, o := range objs {
		v, ok := o.obj.(T)
		if ok && o.name == name && (ns == "" || o.namespace == ns) {
			found = append(found, v)
		}
	}
	if len(found) != 1 {
		var zero T
		t.Fatalf("want one %T named %q in namespace %q, found %d", zero, name, ns, len(found))
	}
	return found[0]
}

// all returns every object of type T.
func all[T any](objs []object) []T {
	var found []T
	for _, o := range objs {
		if v, ok := o.obj.(T); ok {
			found = append(found, v)
		}
	}
	return found
}
