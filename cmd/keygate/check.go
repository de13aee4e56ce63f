package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/keygate/keygate/cmd/keygate/config"
)

// CheckRequest builds the request Envoy would send for method and path with
// the given Authorization secret ("" sends none).
func checkRequest(secret, method, path string) *authv3.CheckRequest {
	id := requestID()
	host := "api.example.com"
	h := map[string]string{
		":method":      method,
		":path":        path,
		":authority":   host,
		":scheme":      "http",
		"x-request-id": id,
		"user-agent":   "keygate-check/" + version,
	}
	if secret != "" {
		h["authorization"] = "Bearer " + secret
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Id: id, Method: method, Path: path, Host: host, Scheme: "http", Protocol: "HTTP/1.1", Headers: h,
		}},
	}}
}

func requestID() string {
	var b [16]byte
	rand.Read(b[:]) //nolint:errcheck // crypto/rand.Read never fails
	return hex.EncodeToString(b[:])
}

type checkView struct {
	Allowed         bool              `json:"allowed"`
	Status          int               `json:"status"`
	Headers         map[string]string `json:"headers,omitempty"`          // set on the upstream request (allow) or the response (deny)
	ResponseHeaders map[string]string `json:"response_headers,omitempty"` // added to the upstream's response (allow)
	HeadersToRemove []string          `json:"headers_to_remove,omitempty"`
	Body            string            `json:"body,omitempty"`
}

func newCheckCmd() *cobra.Command {
	var key, addr, output string
	c := &cobra.Command{
		Use:   "check --key SECRET METHOD PATH [--authz ADDR]",
		Short: "Send one Check to a running server and print the decision (exit 0 allowed, 1 denied, 2 could not ask)",
		Args: func(c *cobra.Command, args []string) error {
			if err := nArgs("METHOD", "PATH")(c, args); err != nil {
				return &exitError{code: 2, err: err}
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			if output != "table" && output != "json" {
				return &exitError{code: 2, err: fmt.Errorf("-o %q: want table or json", output)}
			}
			cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				return &exitError{code: 2, err: fmt.Errorf("--authz %s: %w", addr, err)}
			}
			defer cc.Close()
			ctx, cancel := contextTimeout(c, 10*time.Second)
			defer cancel()
			resp, err := authv3.NewAuthorizationClient(cc).Check(ctx, checkRequest(key, strings.ToUpper(args[0]), args[1]))
			if err != nil {
				msg := err.Error()
				if isUnavailable(err) {
					msg = fmt.Sprintf("cannot reach keygate at %s (is `keygate serve` running? use --authz ADDR): %v", addr, err)
				}
				return &exitError{code: 2, err: errors.New(msg)}
			}
			v := viewCheck(resp)
			if output == "json" {
				err = writeJSON(c.OutOrStdout(), v)
			} else {
				err = printCheck(c.OutOrStdout(), v)
			}
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			if !v.Allowed {
				return &exitError{code: 1}
			}
			return nil
		},
	}
	c.Flags().StringVar(&key, "key", "", "API key secret to send as Authorization: Bearer (omit to send none)")
	c.Flags().StringVar(&addr, "authz", config.DefaultListen, "ext_authz address of a running keygate serve")
	c.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	return c
}

func viewCheck(r *authv3.CheckResponse) checkView {
	if ok := r.GetOkResponse(); ok != nil || (r.GetDeniedResponse() == nil && r.GetStatus().GetCode() == 0) {
		return checkView{
			Allowed: true, Status: 200,
			Headers:         headerMap(ok.GetHeaders()),
			ResponseHeaders: headerMap(ok.GetResponseHeadersToAdd()),
			HeadersToRemove: ok.GetHeadersToRemove(),
		}
	}
	d := r.GetDeniedResponse()
	st := int(d.GetStatus().GetCode())
	if st == 0 {
		st = 403 // Envoy's default for a denial without a status
	}
	return checkView{Status: st, Headers: headerMap(d.GetHeaders()), Body: d.GetBody()}
}

func headerMap(hs []*corev3.HeaderValueOption) map[string]string {
	if len(hs) == 0 {
		return nil
	}
	m := make(map[string]string, len(hs))
	for _, h := range hs {
		m[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
	}
	return m
}

func printCheck(w io.Writer, v checkView) error {
	if v.Allowed {
		fmt.Fprintf(w, "allowed (%d)\n", v.Status)
	} else {
		fmt.Fprintf(w, "denied (%d)\n", v.Status)
	}
	printHeaders(w, "", v.Headers)
	for _, h := range v.HeadersToRemove {
		fmt.Fprintf(w, "  removed: %s\n", h)
	}
	printHeaders(w, "response ", v.ResponseHeaders)
	if v.Body != "" {
		fmt.Fprintf(w, "%s\n", v.Body)
	}
	return nil
}

func printHeaders(w io.Writer, prefix string, m map[string]string) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(w, "  %sheader %s: %s\n", prefix, k, m[k])
	}
}
