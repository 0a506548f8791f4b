"""An independent, functional re-implementation of DeepSeek-OCR v1's vision path, written from the
forward passes of the official DeepEncoder (deepseek-ai/DeepSeek-OCR, deepencoder/sam_vary_sdpa.py
and clip_sdpa.py) and v1's image-token layout, reading weights by their *original* v1 names.

The port builds the same path from transformers' DeepseekOcr2 SAM and CLIPEncoder classes, so
agreement between the two checks SAM (windows, relative positions, neck, downsampling), CLIP-L on
SAM features (class token, position interpolation, quick-GELU, no post-norm), the projector and the
newline/separator layout, and the key map that connects them.
"""
import math

import torch
import torch.nn.functional as F

def interp_abs(pos, tgt):  # SAM: [1,H,W,C]
    if pos.size(1) == tgt: return pos
    return F.interpolate(pos.permute(0,3,1,2).float(), size=(tgt,tgt), mode="bicubic", antialias=True, align_corners=False).permute(0,2,3,1)

def rel(q, k, table):
    m = 2*max(q,k)-1
    if table.shape[0] != m:
        table = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0,2,1), size=m, mode="linear").reshape(-1, m).permute(1,0)
    qc = torch.arange(q)[:, None]*max(k/q,1.0); kc = torch.arange(k)[None,:]*max(q/k,1.0)
    return table[((qc-kc)+(k-1)*max(q/k,1.0)).long()]

def sam_attn(x, sd, p, heads):
    B,H,W,C = x.shape
    qkv = F.linear(x, sd[p+"qkv.weight"], sd[p+"qkv.bias"]).reshape(B,H*W,3,heads,-1).permute(2,0,3,1,4)
    q,k,v = qkv.reshape(3,B*heads,H*W,-1).unbind(0)
    Rh, Rw = rel(H,H,sd[p+"rel_pos_h"]), rel(W,W,sd[p+"rel_pos_w"])
    rq = q.reshape(B*heads,H,W,-1)
    rh = torch.einsum("bhwc,hkc->bhwk", rq, Rh).reshape(B*heads, H*W, H, 1)
    rw = torch.einsum("bhwc,wkc->bhwk", rq, Rw).reshape(B*heads, H*W, 1, W)
    bias = (rh+rw).view(B, heads, H*W, H*W)
    o = F.scaled_dot_product_attention(q.view(B,heads,H*W,-1), k.view(B,heads,H*W,-1), v.view(B,heads,H*W,-1), attn_mask=bias)
    o = o.view(B,heads,H,W,-1).permute(0,2,3,1,4).reshape(B,H,W,-1)
    return F.linear(o, sd[p+"proj.weight"], sd[p+"proj.bias"])

def ln2d(x, w, b, eps=1e-6):
    u = x.mean(1, keepdim=True); s = (x-u).pow(2).mean(1, keepdim=True)
    return w[:,None,None]*((x-u)/torch.sqrt(s+eps)) + b[:,None,None]

def sam(x, sd, cfg):
    p = "model.sam_model."
    x = F.conv2d(x, sd[p+"patch_embed.proj.weight"], sd[p+"patch_embed.proj.bias"], stride=cfg.patch_size).permute(0,2,3,1)
    x = x + interp_abs(sd[p+"pos_embed"], x.size(1))
    for i in range(cfg.num_hidden_layers):
        b = f"{p}blocks.{i}."
        ws = 0 if i in cfg.global_attn_indexes else cfg.window_size
        short = x
        x = F.layer_norm(x, (x.shape[-1],), sd[b+"norm1.weight"], sd[b+"norm1.bias"], 1e-6)
        if ws:
            B,H,W,C = x.shape
            ph, pw = (ws-H%ws)%ws, (ws-W%ws)%ws
            xp = F.pad(x, (0,0,0,pw,0,ph)); Hp, Wp = H+ph, W+pw
            xw = xp.view(B,Hp//ws,ws,Wp//ws,ws,C).permute(0,1,3,2,4,5).reshape(-1,ws,ws,C)
            y = sam_attn(xw, sd, b+"attn.", cfg.num_attention_heads)
            y = y.view(B,Hp//ws,Wp//ws,ws,ws,-1).permute(0,1,3,2,4,5).reshape(B,Hp,Wp,-1)[:, :H, :W]
        else:
            y = sam_attn(x, sd, b+"attn.", cfg.num_attention_heads)
        x = short + y
        h = F.layer_norm(x, (x.shape[-1],), sd[b+"norm2.weight"], sd[b+"norm2.bias"], 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[b+"mlp.lin1.weight"], sd[b+"mlp.lin1.bias"])), sd[b+"mlp.lin2.weight"], sd[b+"mlp.lin2.bias"])
    x = x.permute(0,3,1,2)
    x = ln2d(F.conv2d(x, sd[p+"neck.0.weight"]), sd[p+"neck.1.weight"], sd[p+"neck.1.bias"])
    x = ln2d(F.conv2d(x, sd[p+"neck.2.weight"], padding=1), sd[p+"neck.3.weight"], sd[p+"neck.3.bias"])
    x = F.conv2d(x, sd[p+"net_2.weight"], stride=2, padding=1)
    return F.conv2d(x, sd[p+"net_3.weight"], stride=2, padding=1)

def clip(feat, sd, cfg):
    p = "model.vision_model."
    B = feat.shape[0]
    patches = feat.flatten(2).transpose(1,2)
    emb = torch.cat([sd[p+"embeddings.class_embedding"].expand(B,1,-1), patches], 1)
    pos = sd[p+"embeddings.position_embedding.weight"]
    src, tgt = int(math.sqrt(pos.shape[0]-1)), int(math.sqrt(emb.size(1)))
    if src != tgt:
        g = pos[1:].view(1,src,src,-1).permute(0,3,1,2).float()
        g = F.interpolate(g, size=(tgt,tgt), mode="bicubic", antialias=True, align_corners=False).permute(0,2,3,1).reshape(tgt*tgt,-1)
        pos = torch.cat([pos[:1], g], 0)
    x = emb + pos.unsqueeze(0)
    x = F.layer_norm(x, (x.shape[-1],), sd[p+"pre_layrnorm.weight"], sd[p+"pre_layrnorm.bias"], 1e-5)
    heads = cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        t = f"{p}transformer.layers.{i}."
        h = F.layer_norm(x, (x.shape[-1],), sd[t+"layer_norm1.weight"], sd[t+"layer_norm1.bias"], 1e-5)
        bsz, L, _ = h.shape
        qkv = F.linear(h, sd[t+"self_attn.qkv_proj.weight"], sd[t+"self_attn.qkv_proj.bias"]).view(bsz, L, 3, heads, -1)
        q,k,v = [z.squeeze(2).permute(0,2,1,3) for z in torch.split(qkv, 1, dim=2)]
        o = F.scaled_dot_product_attention(q,k,v).permute(0,2,1,3).reshape(bsz,L,-1)
        x = x + F.linear(o, sd[t+"self_attn.out_proj.weight"], sd[t+"self_attn.out_proj.bias"])
        h = F.layer_norm(x, (x.shape[-1],), sd[t+"layer_norm2.weight"], sd[t+"layer_norm2.bias"], 1e-5)
        f = F.linear(h, sd[t+"mlp.fc1.weight"], sd[t+"mlp.fc1.bias"])
        x = x + F.linear(f*torch.sigmoid(1.702*f), sd[t+"mlp.fc2.weight"], sd[t+"mlp.fc2.bias"])
    return x

def reference_image_tokens(pix, sd, config):
    s = sam(pix, sd, config.sam_config)
    c = clip(s, sd, config.clip_config)
    feats = torch.cat([c[:,1:], s.flatten(2).permute(0,2,1)], -1)
    feats = F.linear(feats, sd["model.projector.layers.weight"], sd["model.projector.layers.bias"])
    out = []
    for f in feats:
        hw, n = f.shape; h = int(hw**0.5)
        g = torch.cat([f.view(h,h,n), sd["model.image_newline"][None,None,:].expand(h,1,n)], 1).view(-1,n)
        out.append(torch.cat([g, sd["model.view_seperator"][None,:]], 0))
    return out


def reference_gundam_tokens(global_pix, crops_pix, grid, sd, config):
    """One page in Gundam mode, as v1's forward builds it: the crops' features as one grid of
    rows x columns crops (newline after every row), then the global view's rows, then the separator."""
    def features(pix):
        s = sam(pix, sd, config.sam_config)
        c = clip(s, sd, config.clip_config)
        feats = torch.cat([c[:, 1:], s.flatten(2).permute(0, 2, 1)], -1)
        return F.linear(feats, sd["model.projector.layers.weight"], sd["model.projector.layers.bias"])
    newline, sep = sd["model.image_newline"], sd["model.view_seperator"]
    g = features(global_pix)[0]
    h = int(g.shape[0] ** 0.5)
    g = torch.cat([g.view(h, h, -1), newline[None, None, :].expand(h, 1, -1)], 1).reshape(-1, g.shape[-1])
    loc = features(crops_pix)
    columns, rows = grid
    h2 = int(loc.shape[1] ** 0.5)
    loc = loc.view(rows, columns, h2, h2, -1).permute(0, 2, 1, 3, 4).reshape(rows * h2, columns * h2, -1)
    loc = torch.cat([loc, newline[None, None, :].expand(rows * h2, 1, -1)], 1).reshape(-1, loc.shape[-1])
    return torch.cat([loc, g, sep[None, :]], 0)
