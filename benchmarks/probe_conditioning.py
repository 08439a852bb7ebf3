"""Language-ID probes on pooled frozen features: raw against standardised, full-batch Adam.

    python benchmarks/probe_conditioning.py   # after python -m mslam_jax.reproduce (its exports)

Reads the large corpus (en, de, ru, el; 80 train / 25 test utterances per language) and the
seed-0 exports of runs/reproduce; prints, per backbone, how much the mean+std pooled features
vary across utterances relative to their magnitude, and the test accuracy of a linear probe
(300 full-batch Adam steps, learning rate 1e-2) on raw and on standardised features
(training-set mean and std per dimension).
"""
import numpy as np, jax, jax.numpy as jnp, optax, os
import mslam_jax
from mslam_jax.downstream import data, backbone as B, engine
corpus=os.path.expanduser('~/mslam_data/corpus_large')
src=data.corpus_speech_source(corpus)
langs=('en','de','ru','el')
tr=data.load_speech(src,'train',languages=langs,max_per_language=80)
te=data.load_speech(src,'test',languages=langs,max_per_language=25)
cls=sorted(langs); ytr=np.array([cls.index(e.language) for e in tr]); yte=np.array([cls.index(e.language) for e in te])
def pooled(bb, ex):
  f=bb.log_mel([e.waveform for e in ex]); out=[]
  fn=jax.jit(lambda p,b: engine.mean_and_std(*bb.speech(p,b['features'],b['feature_paddings'])))
  for rows in engine.in_batches(len(f),32):
    out.append(np.asarray(fn(bb.params, engine.speech_batch([f[i] for i in rows],32)))[:len(rows)])
  return np.concatenate(out)
def probe(xtr,xte,standardize):
  if standardize:
    m=xtr.mean(0); s=xtr.std(0)+1e-6; xtr=(xtr-m)/s; xte=(xte-m)/s
  w=jnp.zeros((xtr.shape[1],4)); b=jnp.zeros(4); opt=optax.adam(1e-2); p=(w,b); st=opt.init(p)
  def loss(p): return optax.softmax_cross_entropy_with_integer_labels(xtr@p[0]+p[1], ytr).mean()
  g=jax.jit(jax.value_and_grad(loss))
  for i in range(300):
    l,gr=g(p); u,st=opt.update(gr,st); p=optax.apply_updates(p,u)
  return float(np.mean(np.argmax(xte@p[0]+p[1],-1)==yte)), float(l)
for name in ['mslam_ctc_seed0','w2v_bert_seed0','random_init_seed0']:
  bb=B.MslamBackbone(mslam_jax.load_encoder(f'runs/reproduce/exports/{name}'))
  xtr,xte=pooled(bb,tr),pooled(bb,te)
  print(name, 'spread of pooled features across utterances / mean magnitude:', float(xtr.std(0).mean()/np.abs(xtr.mean(0)).mean()))
  print(name, 'raw', probe(xtr,xte,False), 'standardized', probe(xtr,xte,True), flush=True)
bb=B.make_backbone('logmel', vocabulary_path=f'{corpus}/vocab.txt')
xtr,xte=pooled(bb,tr),pooled(bb,te)
print('logmel raw', probe(xtr,xte,False), 'standardized', probe(xtr,xte,True))
