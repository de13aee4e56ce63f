package keystore

import (
	"fmt"
	"time"
)

// Period is how often a key's spend cap starts over: calendar periods in
// UTC, so that "100 dollars a month" means what an invoice means.
type Period uint8

// Cap periods. PeriodNone is the design's lifetime cap.
const (
	PeriodNone Period = iota
	PeriodDay
	PeriodMonth
)

// ParsePeriod reads "none" (or ""), "day" or "month".
func ParsePeriod(s string) (Period, error) {
	switch s {
	case "", "none":
		return PeriodNone, nil
	case "day":
		return PeriodDay, nil
	case "month":
		return PeriodMonth, nil
	}
	return PeriodNone, fmt.Errorf("%w: cap period %q: use day, month or none", ErrInvalid, s)
}

func (p Period) String() string {
	switch p {
	case PeriodDay:
		return "day"
	case PeriodMonth:
		return "month"
	}
	return "none"
}

// index numbers the period that holds t: days or months since 1970 (UTC).
// Every time of PeriodNone is in period 0.
func (p Period) index(t time.Time) int32 {
	switch p {
	case PeriodDay:
		return int32(t.Unix() / 86400) // times before 1970 are not a key's
	case PeriodMonth:
		y, m, _ := t.UTC().Date()
		return int32((y-1970)*12 + int(m) - 1)
	}
	return 0
}

// start returns when period i begins.
func (p Period) start(i int32) time.Time {
	switch p {
	case PeriodDay:
		return time.Unix(int64(i)*86400, 0).UTC()
	case PeriodMonth:
		return time.Date(1970+int(i)/12, time.Month(i%12+1), 1, 0, 0, 0, 0, time.UTC)
	}
	return time.Time{}
}

// resetsAt returns when the period that holds t ends; zero for PeriodNone.
func (p Period) resetsAt(t time.Time) time.Time {
	if p == PeriodNone {
		return time.Time{}
	}
	return p.start(p.index(t) + 1)
}
