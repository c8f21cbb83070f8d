"""The Cloudflare Worker bridge from the node's side: the signed HTTPS client and the local
`bridge dev` runner."""
