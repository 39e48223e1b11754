# Print the items of the YAML list named by -v key=NAME, one per line.
#
# Deliberately small: it understands the two spellings cloud-config files use
# for ssh_authorized_keys / public-keys, at any indentation:
#
#   ssh_authorized_keys:                 ssh_authorized_keys: [ "ssh-ed25519 AAAA... a" ]
#     - ssh-ed25519 AAAA... me@host
#     - "ssh-rsa AAAA... other"
#
# Items may be quoted with ' or "; blank and comment lines inside the list are
# skipped; the list ends at the first line that is not an item.
function indent_of(s) {
    match(s, /^[ \t]*/)
    return RLENGTH
}
function unquote(s) {
    sub(/^[ \t]+/, "", s)
    sub(/[ \t]+$/, "", s)
    if (s ~ /^".*"$/ || s ~ /^'.*'$/)
        s = substr(s, 2, length(s) - 2)
    return s
}
BEGIN { inlist = 0 }
{ sub(/\r$/, "") }
inlist {
    if ($0 ~ /^[ \t]*(#.*)?$/)
        next
    if ($0 ~ /^[ \t]*-[ \t]/ && indent_of($0) >= list_indent) {
        item = $0
        sub(/^[ \t]*-[ \t]+/, "", item)
        item = unquote(item)
        if (item != "")
            print item
        next
    }
    inlist = 0
}
$0 ~ ("^[ \t]*[\"']?" key "[\"']?[ \t]*:") {
    rest = $0
    sub(/^[^:]*:/, "", rest)
    rest = unquote(rest)
    if (rest == "") {
        inlist = 1
        list_indent = indent_of($0)
        next
    }
    if (rest ~ /^\[.*\]$/) {
        rest = substr(rest, 2, length(rest) - 2)
        n = split(rest, parts, ",")
        for (i = 1; i <= n; i++) {
            item = unquote(parts[i])
            if (item != "")
                print item
        }
    }
}
