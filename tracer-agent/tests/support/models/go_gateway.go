// Hop B of the parent-inference benchmark (bench_parents.rs) as a Go service,
// standard library only: a net/http server (a goroutine per connection, run with
// GOMAXPROCS=4), and every outgoing call through one shared http.Client whose
// Transport keeps at most 4 connections to the next hop (MaxConnsPerHost) for all
// requests. Concurrent requests queue on, and take turns over, the same pooled
// connections. No database call: the standard library has no PostgreSQL driver,
// so the benchmark runs it with --calls 2 instead.
//
// build: GO111MODULE=off go build -o go_gateway go_gateway.go
// usage: go_gateway PORT --next URL [--calls N]
//
// Per request GET /r/<id>: --calls sequential GETs to {next}/r/<id>, then
// {next}/r2/<id>, ...; then 200 "ok\n".
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: go_gateway PORT --next URL [--calls N]")
		os.Exit(2)
	}
	port := os.Args[1]
	flags := flag.NewFlagSet("go_gateway", flag.ExitOnError)
	next := flags.String("next", "", "the next hop's base URL")
	calls := flags.Int("calls", 1, "sequential calls to the next hop per request")
	flags.Parse(os.Args[2:])
	if *next == "" {
		fmt.Fprintln(os.Stderr, "--next is required")
		os.Exit(2)
	}

	client := &http.Client{
		Transport: &http.Transport{
			MaxConnsPerHost:     4,
			MaxIdleConnsPerHost: 4,
			MaxIdleConns:        4,
			IdleConnTimeout:     90 * time.Second,
		},
		Timeout: 30 * time.Second,
	}

	http.HandleFunc("/r/", func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.ParseUint(strings.TrimPrefix(r.URL.Path, "/r/"), 10, 64)
		if err != nil {
			http.Error(w, "no id", http.StatusNotFound)
			return
		}
		for leg := 1; leg <= *calls; leg++ {
			prefix := "r"
			if leg > 1 {
				prefix = fmt.Sprintf("r%d", leg)
			}
			resp, err := client.Get(fmt.Sprintf("%s/%s/%d", *next, prefix, id))
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadGateway)
				return
			}
			// Read to the end so the connection goes back to the pool.
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				http.Error(w, resp.Status, http.StatusBadGateway)
				return
			}
		}
		body := "ok\n"
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		io.WriteString(w, body)
	})

	ln, err := net.Listen("tcp", "127.0.0.1:"+port)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("ready")
	if err := http.Serve(ln, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
