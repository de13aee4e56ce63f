package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keygate/keygate/keystore/money"
	adminv1 "github.com/keygate/keygate/proto/keygate/admin/v1"
)

// The JSON views are the contract scripts read: snake_case names, money as
// integer _micros with a decimal _usd string beside it, times in RFC 3339.

type accountView struct {
	ID             string `json:"id"`
	Account        string `json:"account"`
	Tier           string `json:"tier"`
	BalanceMicros  int64  `json:"balance_micros"`
	BalanceUSD     string `json:"balance_usd"`
	ReservedMicros int64  `json:"reserved_micros"`
	ReservedUSD    string `json:"reserved_usd"`
	// Both nil when the account has no low-balance alert.
	AlertBelowMicros *int64     `json:"alert_below_micros,omitempty"`
	AlertBelowUSD    *string    `json:"alert_below_usd,omitempty"`
	CreatedAt        *time.Time `json:"created_at,omitempty"`
}

type keyView struct {
	ID                 string     `json:"id"`
	Account            string     `json:"account"`
	Name               string     `json:"name"`
	Scopes             []string   `json:"scopes"`
	State              string     `json:"state"`
	RateLimit          string     `json:"rate_limit"`
	EffectiveRateLimit string     `json:"effective_rate_limit"`
	SpendCapMicros     *int64     `json:"spend_cap_micros"`
	SpendCapUSD        *string    `json:"spend_cap_usd"`
	SpentMicros        int64      `json:"spent_micros"` // in the current cap period
	SpentUSD           string     `json:"spent_usd"`
	ReservedMicros     int64      `json:"reserved_micros"`
	ReservedUSD        string     `json:"reserved_usd"`
	CapPeriod          string     `json:"cap_period"`
	PeriodResetsAt     *time.Time `json:"period_resets_at,omitempty"` // nil for "none"
	CreatedAt          *time.Time `json:"created_at,omitempty"`
	ExpiresAt          *time.Time `json:"expires_at"`
	RevokedAt          *time.Time `json:"revoked_at"`
	RotatedTo          string     `json:"rotated_to,omitempty"`
	Secret             string     `json:"secret,omitempty"`
	OldKey             *keyView   `json:"old_key,omitempty"`
}

func viewAccount(a *adminv1.Account) accountView {
	v := accountView{
		ID: a.GetId(), Account: a.GetId(), Tier: a.GetTier(),
		BalanceMicros: a.GetBalanceMicros(), BalanceUSD: money.Micros(a.GetBalanceMicros()).USD(),
		ReservedMicros: a.GetReservedMicros(), ReservedUSD: money.Micros(a.GetReservedMicros()).USD(),
		CreatedAt: tm(a.GetCreatedAt()),
	}
	if m := a.GetAlertBelowMicros(); m > 0 {
		usd := money.Micros(m).USD()
		v.AlertBelowMicros, v.AlertBelowUSD = &m, &usd
	}
	return v
}

func viewKey(k *adminv1.Key) keyView {
	v := keyView{
		ID: k.GetId(), Account: k.GetAccount(), Name: k.GetName(), Scopes: k.GetScopes(),
		State: k.GetState(), RateLimit: k.GetRateLimit(), EffectiveRateLimit: k.GetEffectiveRateLimit(),
		SpentMicros: k.GetSpentMicros(), SpentUSD: money.Micros(k.GetSpentMicros()).USD(),
		ReservedMicros: k.GetReservedMicros(), ReservedUSD: money.Micros(k.GetReservedMicros()).USD(),
		CapPeriod: k.GetCapPeriod(), PeriodResetsAt: tm(k.GetPeriodResetsAt()),
		CreatedAt: tm(k.GetCreatedAt()), ExpiresAt: tm(k.GetExpiresAt()), RevokedAt: tm(k.GetRevokedAt()),
		RotatedTo: k.GetRotatedTo(),
	}
	if v.Scopes == nil {
		v.Scopes = []string{}
	}
	if v.CapPeriod == "" {
		v.CapPeriod = "none" // a server from before cap periods
	}
	if c := k.GetSpendCapMicros(); c > 0 {
		usd := money.Micros(c).USD()
		v.SpendCapMicros, v.SpendCapUSD = &c, &usd
	}
	return v
}

func tm(t *timestamppb.Timestamp) *time.Time {
	if t == nil {
		return nil
	}
	v := t.AsTime().UTC()
	return &v
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
}

func printAccounts(w io.Writer, as []accountView) error {
	t := newTable(w)
	fmt.Fprintln(t, "ACCOUNT\tTIER\tBALANCE (USD)\tRESERVED (USD)\tALERT BELOW (USD)\tCREATED")
	for _, a := range as {
		alert := "-"
		if a.AlertBelowUSD != nil {
			alert = *a.AlertBelowUSD
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s\n", a.ID, a.Tier, a.BalanceUSD, a.ReservedUSD, alert, when(a.CreatedAt))
	}
	return t.Flush()
}

func printKeys(w io.Writer, ks []keyView) error {
	t := newTable(w)
	fmt.Fprintln(t, "ID\tACCOUNT\tNAME\tSCOPES\tSTATE\tRATE LIMIT\tSPENT (USD)\tRESERVED (USD)\tCAP (USD)\tRESETS\tEXPIRES")
	for _, k := range ks {
		capUSD := "-"
		if k.SpendCapUSD != nil {
			capUSD = *k.SpendCapUSD
		}
		if k.CapPeriod != "none" {
			capUSD += "/" + k.CapPeriod // "10/month"; a bare period ("-/day") still resets SPENT
		}
		rl := k.EffectiveRateLimit
		if k.RateLimit == "" && rl != "" {
			rl += " (tier)"
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, k.Account, dash(k.Name),
			strings.Join(k.Scopes, ","), k.State, dash(rl), k.SpentUSD, k.ReservedUSD, capUSD,
			when(k.PeriodResetsAt), when(k.ExpiresAt))
	}
	return t.Flush()
}

// printSecret shows a new key with its secret and the warning that goes with it.
func printSecret(w io.Writer, k keyView) error {
	if err := printKeys(w, []keyView{k}); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "\nsecret: %s\nStore it now: keygate keeps only its hash and cannot show it again.\n", k.Secret)
	return err
}

func when(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.Format(time.RFC3339)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
