// Command keygate is the ext_authz authorization sidecar for metered APIs:
// `keygate serve` answers Envoy's Checks, and the other commands manage
// accounts and keys through a running server's admin API or directly on a
// store file.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
)

// Set by the linker: -X main.version=... -X main.commit=...
var (
	version = "dev"
	commit  = "unknown"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// exitError carries a specific exit code (keygate check: 1 denied, 2 could
// not ask) through cobra.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func run(args []string, stdout, stderr io.Writer) int {
	root := newRoot(args, stdout, stderr)
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return 0
	}
	code := 1
	var ee *exitError
	if errors.As(err, &ee) {
		code = ee.code
		if ee.err == nil {
			return code
		}
	}
	// Errors about a command already name it ("keygate keys create: ...").
	msg := err.Error()
	if !strings.HasPrefix(msg, "keygate") {
		msg = "keygate: " + msg
	}
	fmt.Fprintln(stderr, msg)
	return code
}

func newRoot(args []string, stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "keygate",
		Short:         "API-key authorization, rate limits and metering for Envoy (ext_authz)",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		// "credit acme -5" reads -5 as a flag; say what the user meant.
		for _, a := range args {
			if len(a) > 1 && a[0] == '-' && strings.Trim(a[1:], "0123456789.") == "" && strings.Contains(err.Error(), a[1:2]) {
				return fmt.Errorf("%s: %s: negative amounts are not allowed", c.CommandPath(), a)
			}
		}
		return fmt.Errorf("%s: %w (see '%s --help')", c.CommandPath(), err, c.CommandPath())
	})
	root.AddCommand(
		newServeCmd(),
		newAccountsCmd(),
		newKeysCmd(),
		newCheckCmd(),
		newMigrateCmd(),
		&cobra.Command{
			Use:   "version",
			Short: "Print the version and commit",
			Args:  noArgs,
			Run: func(c *cobra.Command, _ []string) {
				fmt.Fprintf(c.OutOrStdout(), "keygate %s (commit %s)\n", version, commit)
			},
		},
	)
	return root
}

// noArgs and nArgs give argument errors that name the command and what it wants.
func noArgs(c *cobra.Command, args []string) error {
	if len(args) > 0 {
		return fmt.Errorf("%s: unexpected argument %q", c.CommandPath(), args[0])
	}
	return nil
}

func nArgs(names ...string) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if len(args) < len(names) {
			return fmt.Errorf("%s: missing %s (usage: %s)", c.CommandPath(), names[len(args)], c.UseLine())
		}
		if len(args) > len(names) {
			return fmt.Errorf("%s: unexpected argument %q (usage: %s)", c.CommandPath(), args[len(names)], c.UseLine())
		}
		return nil
	}
}
