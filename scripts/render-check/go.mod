module tfcluster/render-check

go 1.25.0

require (
	github.com/coredns/caddy v1.1.4-0.20250930002214-15135a999495
	mvdan.cc/sh/v3 v3.13.1
)
