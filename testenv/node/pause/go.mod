module gkm.local/pause

go 1.22
