import hashlib, os, json
def w(target, name, data):
    d=f"corpus/{target}"; os.makedirs(d, exist_ok=True)
    if isinstance(data,str): data=data.encode()
    open(f"{d}/{name}","wb").write(data)
H1="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
H2="60303AE22B998861BCE3B28F33EEC1BE758A213C86C93C076DBE9F558C11C752"
spec=open('/work/shared/SPEC.md').read().split('```json')
cfgs={
 'spec_example': spec[1].split('```')[0],
 'minimal': '{"key_list":{"cluster":"keyservice","path":"/v1/keys"}}',
 'bom': '\ufeff{"key_list":{"cluster":"k","path":"/"}}',
 'trailing': '{"key_list":{"cluster":"k","path":"/"}} x',
 'dup_member': '{"key_list":{"cluster":"k","cluster":"j","path":"/"}}',
 'dup_map': '{"key_list":{"cluster":"k","path":"/","headers":{"a":"1","a":"2"}}}',
 'unknown': '{"key_list":{"cluster":"k","path":"/"},"bogus":1}',
 'errors': '{"key_list":{"cluster":"k","path":"/"},"errors":{"invalid_key":{"status":401,"headers":{"WWW-Authenticate":"ApiKey"}},"rate_limited":{"body":"{retry_after}"}}}',
 'whoami_upstream': '{"key_list":{"cluster":"k","path":"/"},"whoami":{"path":"/me","methods":["get"]},"upstream":{"key_id_header":null,"owner_header":"x-org","strip_credential":false}}',
 'bad_cidr': '{"key_list":{"cluster":"k","path":"/"},"ip_allow":["10.0.0.0/8","10.0.0.300/8"]}',
 'not_json': 'not json',
}
for k,v in cfgs.items(): w('configuration',k,v)
def k(extra='',i='a',h=H1): return '{"id":"%s","hash":"%s","owner":"o"%s}' % (i,h,extra)
docs={
 'spec_example': spec[2].split('```')[0],
 'good': '{"version":"v","owners":{"o":{}},"plans":{"p":{"rate_limits":[{"limit":1,"window_s":2}]}},"keys":[%s,%s]}' % (k(',"plan":"p","scopes":["x:*"]'), k(',"expires_at":5,"allowed_ips":["10.0.0.0/8"]','b\\u0041',H2)),
 'late_head': '{"keys":[%s],"plans":{"p":{}},"owners":{"o":{"status":"disabled"}}}' % k(',"plan":"p"'),
 'trailing': '{"keys":[]} garbage',
 'bom': '\ufeff{"keys":[]}',
 'dup_owner': '{"owners":{"o":{"status":"disabled"},"o":{}},"keys":[%s]}' % k(),
 'dup_key_field': '{"keys":[%s]}' % k(',"id":"b"'),
 'unknown_key_field': '{"keys":[%s]}' % k(',"alowed_ips":["10.0.0.0/8"]'),
 'metadata': '{"meta":{"a":[1,{"b":null}]},"keys":[%s]}' % k(',"meta":{},"name":"n","created_at":"2026-01-01T00:00:00Z"'),
 'owner_limits': '{"owners":{"o":{"rate_limits":[{"limit":5,"window_s":60}]}},"keys":[%s]}' % k(),
 'dup_id': '{"keys":[%s,%s]}' % (k(), k('','a',H2)),
 'bad_hash': '{"keys":[{"id":"a","hash":"abc","owner":"o"}]}',
 'cut': '{"keys":[%s,{"id":"b"' % k(),
 'empty_elem': '{"keys":[1,,2]}',
 'not_object': '[]',
}
sizes=[b'\x00', b'\x01\x01', b'\x03\x07\x02\x40']
for i,(name,v) in enumerate(docs.items()):
    w('key_list',name, sizes[i%3]+v.encode())
creds={
 'plain': '\nx-api-key: ak_live_1',
 'twice': '\nx-api-key: ak_live_1\nx-api-key: bogus',
 'comma': '\nx-api-key: ak_live_1, bogus',
 'bearer': '\nauthorization: Bearer ak_live_1',
 'bearer_twice': '\nauthorization: Bearer a\nauthorization: Basic b',
 'query_plus': 'api_key=ak_x+y&a=1',
 'query_twice': 'api_key=a&api%5Fkey=b',
 'query_escapes': 'api_key=%41%2B%zz%',
 'empty_then_query': 'api_key=k\nx-api-key:  \nauthorization: Bearer ',
}
for n,v in creds.items(): w('credentials',n,v)
paths=['/public/..;/admin/users','/a/./b/../c','/%2e%2e/%2F/admin','/public%3B/../admin','//a\\b;x/..','/%%341','/a;b=c/d;e?q=1#f','/swagger%2f..%2fadmin','*','/\u00e9/..;/x']
for i,v in enumerate(paths): w('path_normalisation',f'p{i}',v)
ips={
 'v4':'127.0.0.1:5000\n1\n203.0.113.7, 10.0.0.1',
 'v6':'[2001:db8::1]:443\n2\n::ffff:1.2.3.4,[2001:db8::2]:80, 9.9.9.9',
 'port0':'127.0.0.2:0\n0\n1.1.1.1',
 'junk':'/tmp/sock\n64\n,,, x ,\t1.2.3.4:99',
}
for n,v in ips.items(): w('client_address',n,v)
cidrs={'mixed':'10.0.0.0/8\n2001:db8::/32\n203.0.113.7\n::ffff:10.1.2.3/128','bad':'1.2.3.4/33','edge':'0.0.0.0/0\n::/0\n255.255.255.255/32','hostbits':'10.1.2.3/8\n2001:db8::1/127'}
for n,v in cidrs.items(): w('cidr_list',n,v)
reqs={
 'good':'GET\n/v1/x\n127.0.0.1:1000\nx-api-key: ak_live_good',
 'twice':'GET\n/v1/x\n127.0.0.1:1000\nx-api-key: ak_live_good\nx-api-key: ak_live_bogus',
 'bypass':'GET\n/public/..;/admin/users\n127.0.0.1:1000',
 'scoped':'POST\n/v1/contacts/7\n127.0.0.1:1000\nauthorization: Bearer ak_live_scoped',
 'query':'GET\n/admin?api_key=ak_live_good&x=1\n127.0.0.1:1000',
 'revoked':'GET\n/x\n[::1]:9\nx-api-key: ak_live_revoked',
 'ipbound_xff':'GET\n/x\n127.0.0.1:9\nx-forwarded-for: 8.8.8.8, 127.0.0.1\nx-api-key: ak_live_ipbound',
 'preflight':'OPTIONS\n/admin\n127.0.0.1:1\norigin: x\naccess-control-request-method: GET',
 'whoami':'GET\n/whoami\n127.0.0.1:1\nx-api-key: ak_live_limited',
 'denied':'GET\n/healthz\n10.6.6.1:1',
}
for n,v in reqs.items(): w('decision',n,v)
