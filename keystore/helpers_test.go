package keystore_test

import (
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

func tempPath(t testing.TB) string {
	t.Helper()
	return filepath.Join(t.TempDir(), "keygate.db")
}

// mustOpen opens path; the caller closes the store.
func mustOpen(t testing.TB, path string) *keystore.Store {
	t.Helper()
	s, err := keystore.Open(path, keystore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func mustAccount(t testing.TB, s *keystore.Store, id string, balance money.Micros) {
	t.Helper()
	if _, err := s.CreateAccount(id, "free", balance, t0); err != nil {
		t.Fatal(err)
	}
}

func mustKey(t testing.TB, s *keystore.Store, nk keystore.NewKey) (keystore.KeyInfo, string) {
	t.Helper()
	k, secret, err := s.CreateKey(nk, t0)
	if err != nil {
		t.Fatal(err)
	}
	return k, secret
}

func mustLookup(t testing.TB, s *keystore.Store, secret string) *keystore.Key {
	t.Helper()
	k, ok := s.Lookup(secret, t0)
	if !ok {
		t.Fatalf("Lookup(%s...) failed", secret[:6])
	}
	return k
}

// metric returns the one metric of family name in reg whose labels include
// the given name, value pairs.
func metric(t testing.TB, reg *prometheus.Registry, name string, labels ...string) *dto.Metric {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					found = found || (lp.GetName() == labels[i] && lp.GetValue() == labels[i+1])
				}
				if !found {
					continue next
				}
			}
			return m
		}
	}
	t.Fatalf("no metric %s%v", name, labels)
	return nil
}
