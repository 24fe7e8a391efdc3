// Command healthcheck exits 0 when a URL answers HTTP 200, and 1 otherwise.
//
// The Docker images are FROM scratch: no shell, no curl. Their health checks
// run this static binary instead, e.g. against CoreDNS's ready endpoint:
//
//	healthcheck http://127.0.0.1:18181/ready
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: healthcheck URL")
		os.Exit(2)
	}
	url := os.Args[1]
	client := http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(os.Stderr, "%s: %s\n", url, resp.Status)
		os.Exit(1)
	}
}
