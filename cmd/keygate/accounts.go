package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/keystore/money"
	adminv1 "github.com/keygate/keygate/proto/keygate/admin/v1"
)

func newAccountsCmd() *cobra.Command {
	var af adminFlags
	c := &cobra.Command{
		Use:   "accounts",
		Short: "Create, show and credit accounts",
	}
	af.register(c)

	show := func(c *cobra.Command, a *adminv1.Account) error {
		v := viewAccount(a)
		if af.output == "json" {
			return writeJSON(c.OutOrStdout(), v)
		}
		return printAccounts(c.OutOrStdout(), []accountView{v})
	}

	var balance, tier, createAlert string
	create := &cobra.Command{
		Use:   "create ACCOUNT [--balance USD] [--tier NAME] [--alert-below USD]",
		Short: "Create an account",
		Args:  nArgs("ACCOUNT"),
		RunE: func(c *cobra.Command, args []string) error {
			alert, err := alertBelowFlag(c, createAlert)
			if err != nil {
				return err
			}
			return af.do(c, func(ctx context.Context, cl adminv1.AdminClient) error {
				a, err := cl.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: args[0], BalanceUsd: balance, Tier: tier, AlertBelowUsd: alert})
				if err != nil {
					return err
				}
				return show(c, a)
			})
		},
	}
	create.Flags().StringVar(&balance, "balance", "", "starting balance in USD, e.g. 10 or 0.5 (default 0)")
	create.Flags().StringVar(&tier, "tier", "", "tier that sets the default rate limit of the account's keys (default: the config's default_tier)")
	create.Flags().StringVar(&createAlert, "alert-below", "", "send an account_balance_low alert when the balance falls below this many USD (default: no alert)")

	get := &cobra.Command{
		Use:   "get ACCOUNT",
		Short: "Show an account and its balance",
		Args:  nArgs("ACCOUNT"),
		RunE: func(c *cobra.Command, args []string) error {
			return af.do(c, func(ctx context.Context, cl adminv1.AdminClient) error {
				a, err := cl.GetAccount(ctx, &adminv1.GetAccountRequest{Id: args[0]})
				if err != nil {
					return err
				}
				return show(c, a)
			})
		},
	}

	var creditAlert string
	credit := &cobra.Command{
		Use:   "credit ACCOUNT USD [--alert-below USD]",
		Short: "Add USD to an account's balance",
		Args:  nArgs("ACCOUNT", "USD"),
		RunE: func(c *cobra.Command, args []string) error {
			alert, err := alertBelowFlag(c, creditAlert)
			if err != nil {
				return err
			}
			return af.do(c, func(ctx context.Context, cl adminv1.AdminClient) error {
				a, err := cl.CreditAccount(ctx, &adminv1.CreditAccountRequest{Id: args[0], AmountUsd: args[1], AlertBelowUsd: alert})
				if err != nil {
					return err
				}
				return show(c, a)
			})
		},
	}
	credit.Flags().StringVar(&creditAlert, "alert-below", "", "also set the low-balance alert level, in USD (0 removes the alert; default: unchanged)")

	list := &cobra.Command{
		Use:   "list",
		Short: "List accounts",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			return af.do(c, func(ctx context.Context, cl adminv1.AdminClient) error {
				r, err := cl.ListAccounts(ctx, &adminv1.ListAccountsRequest{})
				if err != nil {
					return err
				}
				vs := make([]accountView, 0, len(r.GetAccounts()))
				for _, a := range r.GetAccounts() {
					vs = append(vs, viewAccount(a))
				}
				if af.output == "json" {
					return writeJSON(c.OutOrStdout(), vs)
				}
				return printAccounts(c.OutOrStdout(), vs)
			})
		},
	}
	c.AddCommand(create, get, credit, list)
	return c
}

// alertBelowFlag returns what to send as alert_below_usd: nil when
// --alert-below was not given, so that a credit leaves the alert as it is.
// The value is checked here, before anything is opened or dialled, so that
// the error names the flag.
func alertBelowFlag(c *cobra.Command, v string) (*string, error) {
	if !c.Flags().Changed("alert-below") {
		return nil, nil
	}
	if _, err := money.ParseUSD(v); err != nil {
		return nil, fmt.Errorf("--alert-below: %w", err)
	}
	return &v, nil
}
