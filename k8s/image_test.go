package k8s

import (
	"bufio"
	"bytes"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
)

// TestStaticBinary builds keygate as the Dockerfile does and checks that the
// binary needs nothing from the image: no dynamic loader, no shared library.
// The image is FROM scratch, so a dynamic binary would not even start.
func TestStaticBinary(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go is not on PATH")
	}
	bin := filepath.Join(t.TempDir(), "keygate")
	cmd := exec.Command(goBin, "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./cmd/keygate")
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 go build ./cmd/keygate: %v\n%s", err, out)
	}
	if err := static(bin); err != nil {
		t.Fatal(err)
	}
}

// TestStaticCatchesDynamic: static must refuse a dynamically linked binary,
// or TestStaticBinary proves nothing.
func TestStaticCatchesDynamic(t *testing.T) {
	for _, p := range []string{"/bin/sh", "/bin/ls", "/usr/bin/env"} {
		if _, err := os.Stat(p); err != nil {
			continue
		}
		if err := static(p); err == nil {
			t.Errorf("static(%s) = nil, want an error: it is dynamically linked", p)
		}
		return
	}
	t.Skip("no dynamically linked binary found to check against")
}

// static reports why the ELF file at path is not statically linked, if it is not.
func static(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var errs []error
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			errs = append(errs, fmt.Errorf("%s has a PT_INTERP program header: it needs a dynamic loader", path))
		}
	}
	needed, err := f.DynString(elf.DT_NEEDED)
	if err != nil {
		errs = append(errs, err)
	}
	if len(needed) > 0 {
		errs = append(errs, fmt.Errorf("%s needs shared libraries %v", path, needed))
	}
	return errors.Join(errs...)
}

// TestDockerfile checks the Dockerfile against what the manifests expect
// of the image: no shell at run time, the user they run as, the entrypoint
// their args follow.
func TestDockerfile(t *testing.T) {
	ins := dockerfile(t, "../Dockerfile")
	var stages []string
	var user string
	var entrypoint, cmd []string
	built := false
	for _, in := range ins {
		switch in.op {
		case "FROM":
			stages = append(stages, strings.Fields(in.args)[0])
			user, entrypoint, cmd = "", nil, nil
		case "USER":
			user = in.args
		case "ENTRYPOINT":
			entrypoint = execForm(t, in)
		case "CMD":
			cmd = execForm(t, in)
		case "RUN":
			built = built || (strings.Contains(in.args, "CGO_ENABLED=0 go build") && strings.Contains(in.args, "./cmd/keygate"))
		}
	}
	if len(stages) == 0 || stages[len(stages)-1] != "scratch" {
		t.Errorf("final stage is FROM %v, want scratch: nothing but the binary", stages)
	}
	if !built {
		t.Error("no RUN builds ./cmd/keygate with CGO_ENABLED=0")
	}
	if want := fmt.Sprintf("%d:%d", imageUID, imageUID); user != want {
		t.Errorf("final stage USER %q, want %s (the manifests' runAsUser and runAsGroup)", user, want)
	}
	if !slices.Equal(entrypoint, []string{"/usr/local/bin/keygate"}) || !slices.Equal(cmd, []string{"serve"}) {
		t.Errorf("ENTRYPOINT %q CMD %q, want the binary and serve: the manifests pass serve's args", entrypoint, cmd)
	}

	// Every keygate container runs this image's entrypoint.
	for _, dir := range []string{"overlays/sidecar", "overlays/gateway"} {
		for _, dep := range all[*appsv1.Deployment](render(t, dir)) {
			for _, c := range dep.Spec.Template.Spec.Containers {
				if c.Name == "keygate" && (c.Image != "keygate:dev" || len(c.Command) != 0) {
					t.Errorf("%s: keygate container runs %s %q, want the image keygate:dev's entrypoint", dir, c.Image, c.Command)
				}
			}
		}
	}
}

type instruction struct {
	op, args string
	line     int
}

// dockerfile reads a Dockerfile's instructions, joining continued lines.
func dockerfile(t *testing.T, path string) []instruction {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var ins []instruction
	var cur strings.Builder
	start := 0
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if cur.Len() == 0 && (line == "" || strings.HasPrefix(line, "#")) {
			continue
		}
		if strings.HasPrefix(line, "#") {
			continue // a comment inside a continued instruction
		}
		if cur.Len() == 0 {
			start = n
		}
		if body, ok := strings.CutSuffix(line, "\\"); ok {
			cur.WriteString(body + " ")
			continue
		}
		cur.WriteString(line)
		op, args, _ := strings.Cut(cur.String(), " ")
		ins = append(ins, instruction{op: strings.ToUpper(op), args: strings.TrimSpace(args), line: start})
		cur.Reset()
	}
	if cur.Len() != 0 {
		t.Fatalf("%s: ends inside a continued line", path)
	}
	return ins
}

// execForm decodes an instruction's JSON (exec) form; the shell form would
// need a shell in the image.
func execForm(t *testing.T, in instruction) []string {
	t.Helper()
	var argv []string
	if err := json.Unmarshal([]byte(in.args), &argv); err != nil {
		t.Errorf("Dockerfile:%d: %s is not in exec form (JSON array): the image has no shell", in.line, in.op)
	}
	return argv
}
