#!/usr/bin/env python3
"""Rewrites an f32 safetensors file with f16 tensors (IEEE half, round to nearest even), keeping
names, shapes and metadata. Pure Python (no numpy): used to make the embedded model
assets/mnist-unet/diffusion_pytorch_model.safetensors from the EMA weights `qtaylor train`
wrote.  Usage: scripts/safetensors-to-f16.py IN.safetensors OUT.safetensors"""
import json, struct, sys
src, dst = sys.argv[1], sys.argv[2]
b=open(src,'rb').read()
n=struct.unpack('<Q',b[:8])[0]; h=json.loads(b[8:8+n]); data=b[8+n:]
out={}; chunks=[]; off=0
for k,v in sorted((k,v) for k,v in h.items() if k!='__metadata__'):
    s,e=v['data_offsets']; cnt=(e-s)//4
    vals=struct.unpack('<%df'%cnt, data[s:e]); a=struct.pack('<%de'%cnt,*vals)
    out[k]={'dtype':'F16','shape':v['shape'],'data_offsets':[off,off+len(a)]}; chunks.append(a); off+=len(a)
if '__metadata__' in h: out['__metadata__']=h['__metadata__']
hb=json.dumps(out,separators=(',',':')).encode(); hb+=b' '*((8-len(hb)%8)%8)
tmp=dst+'.part'
open(tmp,'wb').write(struct.pack('<Q',len(hb))+hb+b''.join(chunks))
import os
os.replace(tmp, dst)
