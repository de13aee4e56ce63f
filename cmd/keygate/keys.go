package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/keystore"
	adminv1 "github.com/keygate/keygate/proto/keygate/admin/v1"
)

func newKeysCmd() *cobra.Command {
	var af adminFlags
	c := &cobra.Command{
		Use:   "keys",
		Short: "Issue, show, revoke and rotate API keys",
	}
	af.register(c)

	show := func(c *cobra.Command, k *adminv1.Key) error {
		v := viewKey(k)
		if af.output == "json" {
			return writeJSON(c.OutOrStdout(), v)
		}
		return printKeys(c.OutOrStdout(), []keyView{v})
	}

	var ck struct{ account, scopes, name, rate, spendCap, capPeriod, expiresIn string }
	create := &cobra.Command{
		Use: "create --account ACCOUNT --scopes S1,S2 [--name TEXT] [--rate-limit N/s|N/m|N/h|N/d] [--spend-cap USD] " +
			"[--cap-period day|month|none] [--expires-in DURATION]",
		Short: "Issue a key; its secret is shown this once",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			// Checked before anything is opened or dialled, so that the
			// error names the flag.
			if _, err := keystore.ParsePeriod(ck.capPeriod); err != nil {
				return fmt.Errorf("--cap-period %q: want day, month or none", ck.capPeriod)
			}
			return af.do(c, func(ctx context.Context, cl adminv1.AdminClient) error {
				r, err := cl.CreateKey(ctx, &adminv1.CreateKeyRequest{
					Account: ck.account, Scopes: splitScopes(ck.scopes), Name: ck.name,
					RateLimit: ck.rate, SpendCapUsd: ck.spendCap, CapPeriod: ck.capPeriod, ExpiresIn: ck.expiresIn,
				})
				if err != nil {
					return err
				}
				v := viewKey(r.GetKey())
				v.Secret = r.GetSecret()
				if af.output == "json" {
					return writeJSON(c.OutOrStdout(), v)
				}
				return printSecret(c.OutOrStdout(), v)
			})
		},
	}
	f := create.Flags()
	f.StringVar(&ck.account, "account", "", "account the key belongs to (required)")
	f.StringVar(&ck.scopes, "scopes", "", "comma-separated scopes, e.g. chat:read,chat:write (required)")
	f.StringVar(&ck.name, "name", "", "a label for operators")
	f.StringVar(&ck.rate, "rate-limit", "", "the key's own rate limit, N/s, N/m, N/h or N/d (default: its account tier's)")
	f.StringVar(&ck.spendCap, "spend-cap", "", "most the key may spend, in USD, per --cap-period (default: no cap)")
	f.StringVar(&ck.capPeriod, "cap-period", "none", "when the spend cap starts over: day or month (calendar periods, UTC), or none for the key's lifetime")
	f.StringVar(&ck.expiresIn, "expires-in", "", "lifetime, e.g. 720h or 90d (default: never expires)")

	get := &cobra.Command{
		Use:   "get KEY_ID",
		Short: "Show a key (never its secret)",
		Args:  nArgs("KEY_ID"),
		RunE: func(c *cobra.Command, args []string) error {
			return af.do(c, func(ctx context.Context, cl adminv1.AdminClient) error {
				k, err := cl.GetKey(ctx, &adminv1.GetKeyRequest{Id: args[0]})
				if err != nil {
					return err
				}
				return show(c, k)
			})
		},
	}

	var listAccount string
	list := &cobra.Command{
		Use:   "list [--account ACCOUNT]",
		Short: "List keys",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			return af.do(c, func(ctx context.Context, cl adminv1.AdminClient) error {
				r, err := cl.ListKeys(ctx, &adminv1.ListKeysRequest{Account: listAccount})
				if err != nil {
					return err
				}
				vs := make([]keyView, 0, len(r.GetKeys()))
				for _, k := range r.GetKeys() {
					vs = append(vs, viewKey(k))
				}
				if af.output == "json" {
					return writeJSON(c.OutOrStdout(), vs)
				}
				return printKeys(c.OutOrStdout(), vs)
			})
		},
	}
	list.Flags().StringVar(&listAccount, "account", "", "only this account's keys")

	revoke := &cobra.Command{
		Use:   "revoke KEY_ID",
		Short: "Revoke a key: refused from the next Check on",
		Args:  nArgs("KEY_ID"),
		RunE: func(c *cobra.Command, args []string) error {
			return af.do(c, func(ctx context.Context, cl adminv1.AdminClient) error {
				k, err := cl.RevokeKey(ctx, &adminv1.RevokeKeyRequest{Id: args[0]})
				if err != nil {
					return err
				}
				return show(c, k)
			})
		},
	}

	var grace string
	rotate := &cobra.Command{
		Use:   "rotate KEY_ID [--grace DURATION]",
		Short: "Issue a replacement key; the old one works for the grace period, then stops",
		Args:  nArgs("KEY_ID"),
		RunE: func(c *cobra.Command, args []string) error {
			return af.do(c, func(ctx context.Context, cl adminv1.AdminClient) error {
				r, err := cl.RotateKey(ctx, &adminv1.RotateKeyRequest{Id: args[0], Grace: grace})
				if err != nil {
					return err
				}
				v := viewKey(r.GetKey())
				v.Secret = r.GetSecret()
				old := viewKey(r.GetOldKey())
				v.OldKey = &old
				if af.output == "json" {
					return writeJSON(c.OutOrStdout(), v)
				}
				return printSecret(c.OutOrStdout(), v)
			})
		},
	}
	rotate.Flags().StringVar(&grace, "grace", "0", "how long the old key keeps working, e.g. 24h or 7d (0: it stops at once)")

	c.AddCommand(create, get, list, revoke, rotate)
	return c
}

// splitScopes reads "a,b, c" as [a b c]; empty items are kept so the server
// can name them.
func splitScopes(s string) []string {
	if strings.TrimSpace(s) == "" {
		return nil
	}
	parts := strings.Split(s, ",")
	for i := range parts {
		parts[i] = strings.TrimSpace(parts[i])
	}
	return parts
}
